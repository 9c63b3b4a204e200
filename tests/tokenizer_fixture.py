"""A small tokenizer.json shaped like Llama-3's (byte-level BPE, special tokens above the regular ids, BOS
added to every text), trained here with the real ``tokenizers`` library on Python's standard library,
as the GPU kit's make_tokenizer.py trains the one the GPU hosts use."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2000
BOS = "<|begin_of_text|>"


def make_model_dir(out: Path, vocab: int = VOCAB) -> Path:
    """A model directory with config.json and a trained tokenizer.json; returns it."""
    # A corpus that does not change with this project's code: trained on its own sources, the tokenizer (and
    # the tests' exact-length counts) changed whenever a module under loadgen/ or docs/ did.
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(encoding="utf-8") for f in files), trainer)
    tok.add_special_tokens([BOS, "<|end_of_text|>", "<|reserved_special_token_0|>"])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    return out
