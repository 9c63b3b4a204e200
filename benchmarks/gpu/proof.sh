#!/usr/bin/env bash
# The GPU proof of issue 4, as one script: studies from search_spaces/examples/gpu-ENGINE-*.yaml, then a
# summary with start times, the levels each launch measured, GPU duty cycle and best valid vs baseline.
# Usage: proof.sh ENGINE OUTDIR [STUDY ...]   (after host_setup.sh; ENGINE = vllm | sglang)
#   STUDY: the part of the file name after gpu-ENGINE-; default: llama8b-tp1 mustfail-70b
#   (llama8b-tp1: the ≥10-trial search on one GPU per trial; mustfail-70b: a trial that must fail with oom;
#    llama8b-tp2: one tensor-parallel trial over both GPUs; llama8b: TP 1 and 2 searched together;
#    llama8b-fp8: baseline against fp8 with 20 s levels; llama8b-h100-baseline: one trial, the keep-up rule;
#    llama70b-x8: TP/PP/DP of the 70b shape on 8 GPUs; llama70b-x4: the same search on 4 GPUs;
#    mixtral-1xh200: the mixtral-8x7b baseline against fp8 on one H200, its first level below lo if it fails;
#    smollm2-specdec: speculative decoding on the real SmolLM2, after `smollm2_carry.sh convert`)
# Two studies on one host at once: give each half the GPUs and its own Ray instance, e.g.
#   CUDA_VISIBLE_DEVICES=0,1 RAY_ADDRESS=local proof.sh sglang OUT1 llama8b-tp1 &
#   CUDA_VISIBLE_DEVICES=2,3 RAY_ADDRESS=local proof.sh vllm OUT2 llama8b-tp2
# On hosts where one command may not run long, start it with setsid and poll OUTDIR/progress.log.
# STUDY_DIR (default search_spaces/examples) is where the gpu-ENGINE-STUDY.yaml files are read from.
set -uo pipefail
ENGINE=${1:?engine}; OUT=${2:?out dir}; shift 2
STUDIES=("$@"); [ ${#STUDIES[@]} -gt 0 ] || STUDIES=(llama8b-tp1 mustfail-70b)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
STUDY_DIR=${STUDY_DIR:-$REPO/search_spaces/examples}
source "/tmp/kit-$ENGINE/servetune-env.sh"
mkdir -p "$OUT"
cd "$OUT"
st() { python3 -m servetune.optimizer.cli "$@"; }
{
  for s in "${STUDIES[@]}"; do
    echo "== $(date -u +%FT%TZ) study $ENGINE $s"
    st run "$STUDY_DIR/gpu-$ENGINE-$s.yaml" --output-dir "$OUT/$s"
  done
  echo "== $(date -u +%FT%TZ) summary"
  python3 "$REPO/benchmarks/gpu/summarize.py" "${STUDIES[@]/#/$OUT/}" > "$OUT/summary.md"
  cat "$OUT/summary.md"
  echo "== $(date -u +%FT%TZ) done"
} 2>&1 | tee -a "$OUT/progress.log"
