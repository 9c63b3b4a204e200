#!/usr/bin/env bash
# Issue 15 on one H200, as one detached script (after the vLLM kit parts are in /tmp/kit-vllm):
#   1. the mixtral-8x7b study (gpu-vllm-mixtral-1xh200.yaml) on a cold host, so its first launches meet the
#      fused-MoE Triton JIT that the warm-up and the audit must keep out of every measured level;
#   2. the cross-check (crosscheck.sh) on one vLLM server with the same model and vLLM's defaults.
# The study goes first on purpose: on a host that already compiled these kernels there is no JIT to catch.
# Usage: setsid nohup bash benchmarks/gpu/trust_session.sh /tmp/res > /tmp/trust.log 2>&1 &
# Poll: tar the RES folder into $OUT (requests_* files left out; the crosscheck's own files are small).
set -uo pipefail
RES=${1:-/tmp/res}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$RES"
stamp() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$RES/progress.log"; }

stamp setup
bash "$REPO/benchmarks/gpu/host_setup.sh" vllm > "$RES/setup.log" 2>&1 || { stamp "setup failed"; exit 1; }
source /tmp/kit-vllm/servetune-env.sh
MODEL=/tmp/models/mixtral-8x7b

stamp "study mixtral-1xh200"
bash "$REPO/benchmarks/gpu/proof.sh" vllm "$RES/study" mixtral-1xh200 > "$RES/study.log" 2>&1
stamp "study done"

# the engine of the last trial must have let go of the GPU before the next server starts
for _ in $(seq 120); do
  used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  [ "${used:-0}" -lt 2000 ] && break; sleep 1
done
stamp "crosscheck server start (GPU memory used ${used:-?} MiB)"
vllm serve "$MODEL" --load-format dummy --host 127.0.0.1 --port 8000 > "$RES/crosscheck-server.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do
  curl -sf http://127.0.0.1:8000/health >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { stamp "crosscheck server died"; exit 1; }
  sleep 1
done
stamp "crosscheck server ready"
QPS=${QPS:-10} NUM_REQUESTS=${NUM_REQUESTS:-500} WARMUP_REQUESTS=${WARMUP_REQUESTS:-300} RUNS=2 \
  bash "$REPO/benchmarks/gpu/crosscheck.sh" http://127.0.0.1:8000 "$MODEL" vllm "$RES/crosscheck" \
  > "$RES/crosscheck.log" 2>&1
kill -INT $SERVER; wait $SERVER 2>/dev/null
stamp "all done"
