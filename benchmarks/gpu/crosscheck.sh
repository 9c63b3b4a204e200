#!/usr/bin/env bash
# servetune bench against the engine's own benchmark client, on ONE running server, at the same Poisson rate,
# input/output lengths and request count: servetune with text prompts and with token-id prompts, and
# `vllm bench serve` (vLLM) or SGLang's bench_serving (`--dataset-name random-ids`), two runs each, interleaved
# so that drift of the server hits every client alike. /metrics is scraped before and after each run, and
# crosscheck.py prints a side-by-side table (OUT/crosscheck.md, OUT/crosscheck.json): each client's own
# numbers, the same numbers recomputed from per-request data with one definition for all clients, the
# arrivals each client actually produced, and the server's counter deltas and its own latency histograms.
#
# Usage: crosscheck.sh URL MODEL ENGINE [OUT]
#   URL     the running server, e.g. http://127.0.0.1:8000
#   MODEL   the model directory the server loaded (its tokenizer.json builds the prompts), e.g.
#           /tmp/models/llama-3.1-8b; it is also the served model name unless SERVED_NAME says otherwise
#   ENGINE  vllm | sglang: which peer client runs
#   OUT     results folder (default /tmp/crosscheck-ENGINE); runs already in it are overwritten
# Environment (defaults): QPS=20 NUM_REQUESTS=1200 INPUT_TOKENS=1024 OUTPUT_TOKENS=128 WARMUP_REQUESTS=300
#   RUNS=2 (rounds)  TEXT_RUNS=RUNS (of those rounds, how many run servetune with its own text prompts: 0 leaves
#   the peer and the same-prompt replays, when time is short)  IDS_RUNS=RUNS (how many also run token ids)
#   SERVED_NAME=MODEL  EXTRA_RUNS="" ("usage": add servetune text runs that ask for
#   the final usage only, as vllm bench does, instead of per-chunk usage; "paired", vLLM only: after each
#   vllm bench run, a servetune text run that replays its start_times with --arrival-trace, so that the two
#   meet the same bursts and a p99 difference between them is the clients', not the Poisson draw's; "same", vLLM
#   only: that replay sending the run's own prompts too, rebuilt with vLLM's RandomDataset and the same seed
#   (crosscheck.py peer-prompts, then servetune bench --dataset prompts), so that nothing but the clients differs)  SGLANG_BACKEND=sglang-oai
#   ARRIVAL=poisson_exact for vllm (vllm bench rescales its Poisson gaps so the mean rate is exact; 1,200 raw
#   Poisson arrivals span their nominal time ±2.9 %, and throughput with them), poisson for sglang (its client
#   does not rescale)
# On the GPU hosts: after host_setup.sh (it writes /tmp/kit-ENGINE/servetune-env.sh, sourced here), e.g.
#   vllm serve /tmp/models/llama-3.1-8b --load-format dummy &   (wait for /health), then
#   bash benchmarks/gpu/crosscheck.sh http://127.0.0.1:8000 /tmp/models/llama-3.1-8b vllm /tmp/res/crosscheck
set -uo pipefail
URL=${1:?server URL}; MODEL=${2:?model directory}; ENGINE=${3:?engine (vllm or sglang)}
OUT=${4:-/tmp/crosscheck-$ENGINE}
case "$ENGINE" in vllm|sglang) ;; *) echo "ENGINE must be vllm or sglang, got $ENGINE" >&2; exit 2;; esac
QPS=${QPS:-20}; N=${NUM_REQUESTS:-1200}; IN=${INPUT_TOKENS:-1024}; OUTLEN=${OUTPUT_TOKENS:-128}
WARM=${WARMUP_REQUESTS:-300}; RUNS=${RUNS:-2}; TEXT_RUNS=${TEXT_RUNS:-$RUNS}; IDS_RUNS=${IDS_RUNS:-$RUNS}; SERVED=${SERVED_NAME:-$MODEL}; EXTRA_RUNS=${EXTRA_RUNS:-}
DEFAULT_ARRIVAL=poisson_exact; [ "$ENGINE" = sglang ] && DEFAULT_ARRIVAL=poisson
ARRIVAL=${ARRIVAL:-$DEFAULT_ARRIVAL}
HERE=$(cd "$(dirname "$0")" && pwd)
ENV_SH=/tmp/kit-$ENGINE/servetune-env.sh
[ -f "$ENV_SH" ] && source "$ENV_SH"
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cc() { "$PY" "$HERE/crosscheck.py" "$@"; }
st() { "$PY" -m servetune.optimizer.cli bench --url "$URL" --model "$SERVED" --tokenizer "$MODEL" \
         --scenario server --qps "$QPS" --arrival "$ARRIVAL" --input-tokens "$IN" --output-tokens "$OUTLEN" \
         --records-format csv "$@"; }
RUNLIST="$OUT/runs.tsv"
: > "$RUNLIST"

# one measured run: NAME TOOL RESULT_PATH -- command...
measure() {
  local name=$1 tool=$2 result=$3; shift 4
  echo "== $(date -u +%FT%TZ) $name: $*"
  cc scrape "$URL" "$OUT/$name.before.prom" || { echo "cannot scrape $URL/metrics" >&2; exit 1; }
  local t0; t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local t1; t1=$(date +%s.%N)
  cc scrape "$URL" "$OUT/$name.after.prom"
  tail -n 3 "$OUT/$name.log"
  [ $rc -eq 0 ] || echo "!! $name exited with $rc (see $OUT/$name.log)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$tool" "$result" "$t0" "$t1" >> "$RUNLIST"
}

# the peer's optional flags, asked once: skip its ready-check / warm-up request (it would count in the deltas)
PEER_OPTS=()
if [ "$ENGINE" = vllm ]; then  # (the help text first: with pipefail, grep -q closing the pipe fails the test)
  PEER_HELP=$(vllm bench serve --help 2>&1)
  grep -q -- "--ready-check-timeout-sec" <<< "$PEER_HELP" && PEER_OPTS=(--ready-check-timeout-sec 0)
else
  PEER_HELP=$("$PY" -m sglang.bench_serving --help 2>&1)
  grep -q -- "--warmup-requests" <<< "$PEER_HELP" && PEER_OPTS=(--warmup-requests 0)
fi
peer() {  # the engine's own client, seed $1, results to $2
  if [ "$ENGINE" = vllm ]; then
    vllm bench serve --backend vllm --base-url "$URL" --endpoint /v1/completions --model "$SERVED" \
      --tokenizer "$MODEL" --dataset-name random --random-input-len "$IN" --random-output-len "$OUTLEN" \
      --random-range-ratio 0 --num-prompts "$N" --request-rate "$QPS" --seed "$1" --ignore-eos \
      --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --disable-tqdm "${PEER_OPTS[@]}" \
      --save-result --save-detailed --result-dir "$(dirname "$2")" --result-filename "$(basename "$2")"
  else
    rm -f "$2"  # bench_serving appends to its output file
    "$PY" -m sglang.bench_serving --backend "${SGLANG_BACKEND:-sglang-oai}" --base-url "$URL" --model "$SERVED" \
      --tokenizer "$MODEL" --dataset-name random-ids --random-input-len "$IN" --random-output-len "$OUTLEN" \
      --random-range-ratio 1.0 --num-prompts "$N" --request-rate "$QPS" --seed "$1" "${PEER_OPTS[@]}" \
      --output-file "$2" --output-details
  fi
}
# The same-prompt replay follows the peer run that sent those prompts: on 2026-12-06 they were still in the
# prefix cache (9.6 % of the prompt tokens hit; TTFT 9.5 % and TPOT 7.2 % under the peer, and servetune's audit
# failed the runs). vLLM empties it on POST /reset_prefix_cache, which it serves with VLLM_SERVER_DEV_MODE=1
# (trust_session.sh starts its server so); without it the run goes ahead, and its audit and the table say so.
reset_prefix_cache() {
  local reply
  for _ in 1 2 3 4 5; do
    reply=$(curl -s -X POST "$URL/reset_prefix_cache" 2>&1)
    [[ $reply == *'"success":true'* || $reply == *'"success": true'* ]] && { echo "prefix cache reset"; return 0; }
    [[ $reply == *'"success"'* ]] || break  # no such endpoint: retrying will not help
    sleep 2  # blocks still held by requests finishing
  done
  echo "!! could not reset the prefix cache (${reply:0:120}); start vLLM with VLLM_SERVER_DEV_MODE=1 for it:" \
       "the replay may hit the peer's prompts in the cache (see the table's prefix-cache row)"
  return 0
}
# SGLang's client asks for greedy sampling (temperature 0); servetune asks for the same there
SAMPLING=(); [ "$ENGINE" = sglang ] && SAMPLING=(--extra-body '{"temperature": 0.0}')
PEER_EXT=json; [ "$ENGINE" = sglang ] && PEER_EXT=jsonl

echo "== $(date -u +%FT%TZ) crosscheck on $URL ($ENGINE, $MODEL): $N requests at $QPS req/s ($ARRIVAL), $IN in / $OUTLEN out"
# warm-up at the measured rate (kernels, CUDA graphs, allocator): not part of the table
measure warmup servetune "$OUT/warmup/result.json" -- st --num-requests "$WARM" --prompt-format token_ids --seed 99 \
  "${SAMPLING[@]}" -o "$OUT/warmup"
for i in $(seq 1 "$RUNS"); do  # every run its own seed: no prompt of one run is in another's prefix cache
  [ "$i" -le "$TEXT_RUNS" ] && measure "servetune-text-$i" servetune "$OUT/servetune-text-$i/result.json" -- \
    st --num-requests "$N" --prompt-format text --seed "$((10 * i + 1))" "${SAMPLING[@]}" -o "$OUT/servetune-text-$i"
  measure "$ENGINE-bench-$i" "$ENGINE" "$OUT/$ENGINE-bench-$i.$PEER_EXT" -- peer "$i" "$OUT/$ENGINE-bench-$i.$PEER_EXT"
  [ "$i" -le "$IDS_RUNS" ] && measure "servetune-ids-$i" servetune "$OUT/servetune-ids-$i/result.json" -- \
    st --num-requests "$N" --prompt-format token_ids --seed "$((10 * i + 2))" "${SAMPLING[@]}" -o "$OUT/servetune-ids-$i"
  if [[ " $EXTRA_RUNS " == *" paired "* ]] && [ "$ENGINE" = vllm ]; then  # the peer's own arrivals, replayed
    measure "servetune-paired-$i" servetune "$OUT/servetune-paired-$i/result.json" -- \
      st --num-requests "$N" --prompt-format text --seed "$((10 * i + 4))" "${SAMPLING[@]}" \
      --arrival-trace "$OUT/$ENGINE-bench-$i.$PEER_EXT" -o "$OUT/servetune-paired-$i"
  fi
  if [[ " $EXTRA_RUNS " == *" same "* ]] && [ "$ENGINE" = vllm ]; then  # the peer's prompts and arrivals, both
    cc peer-prompts "$MODEL" "$OUT/peer-prompts-$i.json" --num "$N" --input-tokens "$IN" --output-tokens "$OUTLEN" \
      --seed "$i" && reset_prefix_cache && measure "servetune-same-$i" servetune "$OUT/servetune-same-$i/result.json" -- \
      st --num-requests "$N" --dataset prompts --dataset-path "$OUT/peer-prompts-$i.json" --ignore-eos \
      "${SAMPLING[@]}" --arrival-trace "$OUT/$ENGINE-bench-$i.$PEER_EXT" -o "$OUT/servetune-same-$i"
  fi
  if [[ " $EXTRA_RUNS " == *" usage "* ]]; then
    measure "servetune-text-final-usage-$i" servetune "$OUT/servetune-text-final-usage-$i/result.json" -- \
      st --num-requests "$N" --prompt-format text --seed "$((10 * i + 3))" \
      --extra-body "{\"stream_options\": {\"include_usage\": true}$([ "$ENGINE" = sglang ] && echo ', "temperature": 0.0')}" \
      -o "$OUT/servetune-text-final-usage-$i"
  fi
done
echo "== $(date -u +%FT%TZ) table"
cc table "$OUT" --peer "$ENGINE"
