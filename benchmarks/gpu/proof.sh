#!/usr/bin/env bash
# The GPU proof of issue 4, as one script: the vLLM (or SGLang) study on the llama-3.1-8b shape, then a
# trial that must fail (llama-3.1-70b fp8 squeezed onto one GPU), then a summary with start times and
# GPU duty cycle. Usage: proof.sh ENGINE OUTDIR   (after host_setup.sh; ENGINE = vllm | sglang)
# On hosts where one command may not run long, start it with setsid and poll OUTDIR/progress.log.
set -uo pipefail
ENGINE=${1:?engine}; OUT=${2:?out dir}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
source "/tmp/kit-$ENGINE/servetune-env.sh"
mkdir -p "$OUT"
cd "$OUT"
st() { python3 -m servetune.optimizer.cli "$@"; }
{
  echo "== $(date -u +%FT%TZ) study $ENGINE"
  st run "$REPO/search_spaces/examples/gpu-$ENGINE-llama8b.yaml" --output-dir "$OUT/study"
  echo "== $(date -u +%FT%TZ) must-fail trial"
  st run "$REPO/search_spaces/examples/gpu-$ENGINE-mustfail-70b.yaml" --output-dir "$OUT/mustfail" --no-report
  echo "== $(date -u +%FT%TZ) summary"
  python3 "$REPO/benchmarks/gpu/summarize.py" "$OUT/study" "$OUT/mustfail" > "$OUT/summary.md"
  cat "$OUT/summary.md"
  echo "== $(date -u +%FT%TZ) done"
} 2>&1 | tee -a "$OUT/progress.log"
