#!/usr/bin/env python3
"""Check a checkpoint written by gguf_to_hf.py the way a user would: greedy completions of a few prompts with
transformers (coherent English, " Paris" after "The capital of France is"), and optionally its logits against
transformers' own GGUF loader on the same file (which un-permutes q/k itself): equal logits prove the
conversion, rotary permutation included.

Usage: python3 smollm2_check.py CHECKPOINT_DIR [--gguf FILE] [--device cpu|cuda]
Needs torch and transformers (the GPU host has both; --gguf also needs the gguf package). Exit 1 on a miss.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = ["The capital of France is", "Water boils at a temperature of",
           "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--gguf", help="the GGUF it came from: compare logits with transformers' GGUF loader")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args(argv)

    # optional, GPU-host only: torch and transformers are no servetune dependency; --help works without them
    import torch  # noqa: PLC0415 — optional: torch, GPU hosts only
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: PLC0415 — optional: transformers, GPU hosts only

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).to(args.device).eval()
    ok = True
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.to(args.device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"{prompt!r} -> {text!r}")
        if prompt.startswith("The capital of France") and "Paris" not in text:
            ok = False
    if args.gguf:
        path = Path(args.gguf)
        ref = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).to(args.device).eval()
        mine = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).to(args.device).eval()
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids.to(args.device)
        with torch.no_grad():
            a, b = mine(ids).logits.float(), ref(ids).logits.float()
        diff = (a - b).abs().max().item()
        same_top = bool((a.argmax(-1) == b.argmax(-1)).all())
        # both dequantize the same Q4_1 values; this checkpoint then rounds them to bf16
        print(f"logits vs transformers' GGUF loader: max |diff| {diff:.4f} (scale {b.abs().max().item():.1f}), "
              f"same argmax at every position: {same_top}")
        ok = ok and same_top and diff < 0.05 * b.abs().max().item()
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
