"""Weight quantization as the memory arithmetic and the engines' rules see it: which method names are one
checkpoint format, and what a checkpoint's own config.json says it is quantized with."""
from __future__ import annotations

from typing import Any

# Names an engine treats as the same checkpoint format.
QUANT_FAMILIES: dict[str, str] = {
    "awq": "awq", "awq_marlin": "awq", "auto_awq": "awq",
    "gptq": "gptq", "gptq_marlin": "gptq", "auto_gptq": "gptq", "marlin": "gptq",
    "fp8": "fp8", "fbgemm_fp8": "fp8",
    "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
    "modelopt": "modelopt", "modelopt_fp8": "modelopt", "modelopt_fp4": "modelopt",
}
CHECKPOINT_ONLY = ("awq", "gptq")  # families that need weights quantized that way on disk
PACKED_4BIT = ("awq", "gptq")  # families whose decoder projections are packed integers plus group scales


def quant_family(q: str | None) -> str | None:
    """The family of a method name (``awq_marlin`` → ``awq``); an unknown name is its own family."""
    if q is None or q is False:
        return None
    q = str(q).lower()
    return QUANT_FAMILIES.get(q, q)


def checkpoint_quant(shape: dict[str, Any]) -> str | None:
    """The checkpoint's own quantization (config.json ``quantization_config.quant_method``), lower-cased."""
    qc = shape.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        return str(qc["quant_method"]).lower()
    return None
