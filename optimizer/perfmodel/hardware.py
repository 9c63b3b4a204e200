"""GPU specifications: the numbers the sim's roofline and the pre-launch memory rules need.

Peak figures are vendor datasheet values for dense (non-sparse) tensor math. No kernel reaches them, so each
spec also carries the *achievable* fraction of peak as explicit fields; the roofline multiplies by them
instead of hiding fudge factors in formulas. The defaults (0.65 compute, 0.80 HBM, 0.70 link) are what
well-tuned serving kernels reach on Hopper-class parts (cuBLAS/CUTLASS GEMMs at 60-70 % MFU for large
shapes, FlashAttention/paged decode at ~80 % of HBM bandwidth, NCCL/custom all-reduce at ~70 % of the
per-direction NVLink rate); with them the sim reproduces vLLM's llama-3.1-8b numbers on an H100 to
within ~10 % (see ``optimizer/engines/sim/estimate.py``). ``sm`` is the compute capability: it decides e.g. which
attention kernels take an fp8 KV cache.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # device memory the engine can see
    bf16_tflops: float  # dense bf16/fp16 tensor-core peak
    fp8_tflops: float | None  # dense fp8 tensor-core peak; None = no fp8 math (fp8 weights get upcast)
    hbm_tb_s: float  # device memory bandwidth, TB/s (1e12 bytes/s)
    link_gb_s: float  # GPU-to-GPU bandwidth per direction, GB/s (NVLink, else PCIe)
    link_latency_us: float = 8.0  # fixed cost of one small all-reduce (launch + sync), microseconds
    nvlink: bool = True  # False: GPUs talk over PCIe
    # Achievable fraction of peak. Separate fields so calibration from real trials can adjust them.
    compute_efficiency: float = 0.65  # of bf16/fp8 tensor peak in large GEMMs
    bandwidth_efficiency: float = 0.80  # of HBM peak when streaming weights / KV
    link_efficiency: float = 0.70  # of per-direction link rate in ring all-reduce
    sm: int | None = None  # compute capability ×10 (90 = SM90, Hopper)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def has_fp8(self) -> bool:
        return self.fp8_tflops is not None

    def peak_flops(self, fp8: bool = False) -> float:
        """Peak FLOP/s for the math dtype; fp8 math falls back to bf16 where the GPU has none."""
        tf = self.fp8_tflops if (fp8 and self.fp8_tflops is not None) else self.bf16_tflops
        return tf * 1e12

    def achievable_flops(self, fp8: bool = False) -> float:
        return self.peak_flops(fp8) * self.compute_efficiency

    @property
    def achievable_bandwidth(self) -> float:
        """Bytes/s of HBM traffic a streaming kernel actually sustains."""
        return self.hbm_tb_s * 1e12 * self.bandwidth_efficiency

    @property
    def achievable_link(self) -> float:
        """Bytes/s per direction between two GPUs under a ring collective."""
        return self.link_gb_s * 1e9 * self.link_efficiency

    def with_memory(self, memory_gib: float | None) -> "GpuSpec":
        """The same GPU with its memory overridden (e.g. a MIG slice or a study's gpu_memory_gib)."""
        if memory_gib is None:
            return self
        if memory_gib <= 0:
            raise ValueError(f"gpu memory must be positive, got {memory_gib} GiB")
        return dataclasses.replace(self, memory_gib=float(memory_gib))


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        # H100 SXM5: NVLink4 is 900 GB/s bidirectional = 450 per direction.
        GpuSpec("h100", memory_gib=80, bf16_tflops=989, fp8_tflops=1979, hbm_tb_s=3.35, link_gb_s=450, sm=90),
        # H200 SXM: H100 silicon with 141 GB HBM3e; only memory size and bandwidth differ.
        GpuSpec("h200", memory_gib=141, bf16_tflops=989, fp8_tflops=1979, hbm_tb_s=4.8, link_gb_s=450, sm=90),
        # A100 SXM 80GB: no fp8 tensor cores; vLLM runs fp8 checkpoints weight-only (Marlin W8A16).
        GpuSpec("a100", memory_gib=80, bf16_tflops=312, fp8_tflops=None, hbm_tb_s=2.0, link_gb_s=300, sm=80),
        # L40S: GDDR6, no NVLink; collectives cross PCIe Gen4 x16 with host-bounce latency.
        GpuSpec("l40s", memory_gib=48, bf16_tflops=362, fp8_tflops=733, hbm_tb_s=0.864, link_gb_s=32,
                link_latency_us=20.0, nvlink=False, sm=89),
        # B200: HBM3e 8 TB/s, NVLink5 1.8 TB/s bidirectional.
        GpuSpec("b200", memory_gib=180, bf16_tflops=2250, fp8_tflops=4500, hbm_tb_s=8.0, link_gb_s=900, sm=100),
        # L4: small inference card, PCIe only.
        GpuSpec("l4", memory_gib=24, bf16_tflops=121, fp8_tflops=242, hbm_tb_s=0.3, link_gb_s=32,
                link_latency_us=20.0, nvlink=False, sm=89),
    )
}

# Spellings people use for the same parts (nvidia-smi names, SKU suffixes).
_ALIASES = {
    "h100-sxm": "h100", "h100-sxm5": "h100", "h100-80gb": "h100", "h100-sxm5-80gb": "h100", "h100-80gb-hbm3": "h100",
    "h200-sxm": "h200", "h200-141gb": "h200",
    "a100-sxm": "a100", "a100-80gb": "a100", "a100-sxm4-80gb": "a100",
    "b200-sxm": "b200",
}


def _normalize(name: str) -> str:
    n = name.strip().lower().replace("_", "-").replace(" ", "-")
    for prefix in ("nvidia-", "nvidia"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return _ALIASES.get(n, n)


def compute_capability(name: str | None) -> int | None:
    """The GPU kind's SM version (90 for an H100), or None for a kind not in the table."""
    key = _normalize(str(name)) if name else ""
    spec = GPUS.get(key)
    return spec.sm if spec else None


def get_gpu(name: str) -> GpuSpec:
    """The spec for a GPU kind (case-insensitive; 'NVIDIA H100', 'h100_sxm' work). Unknown → ValueError."""
    key = _normalize(str(name))
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, list(GPUS) + list(_ALIASES), n=1, cutoff=0.5)
    hint = f" (did you mean {_ALIASES.get(close[0], close[0])!r}?)" if close else ""
    raise ValueError(f"unknown GPU {name!r}{hint}; known: {', '.join(sorted(GPUS))}")
