#!/usr/bin/env bash
# A two-node Ray cluster on one GPU host, and one vLLM trial that must run on the node the driver is not on.
# Usage: two_node_ray.sh OUTDIR [GPU]   (after host_setup.sh vllm; GPU: the device index to lend, default 0)
#
# The head raylet (where the driver runs) declares no GPU; a second raylet, with its own TMPDIR, gets GPU $GPU and
# the name "remote". The study (search_spaces/examples/gpu-vllm-two-node.yaml, llama-3.2-1b with random weights)
# has one trial: it can only be placed on "remote", runs in a scratch directory under that node's TMPDIR, and
# its files travel back through Ray's object store. The script then checks, and prints PASS or FAIL lines:
# the trial completed on "remote"; trial.json, engine.log and the request files are in OUTDIR/run; the remote
# scratch directory is gone. Nothing multi-node is proved on one machine: both raylets share the file system,
# the network and the host; what runs is the code path of a remote node (scratch, object store, home).
# Both raylets run in process groups of their own and only those are stopped at the end (never `ray stop`,
# which would stop every Ray instance of the host). ENV_SH, STUDY and PORT may be overridden (a CPU dry run:
# ENV_SH=/dev/null STUDY=a-sim-study.yaml).
set -uo pipefail
OUT=${1:?out dir}; GPU=${2:-0}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ENV_SH=${ENV_SH:-/tmp/kit-vllm/servetune-env.sh}
STUDY=${STUDY:-$REPO/search_spaces/examples/gpu-vllm-two-node.yaml}
PORT=${PORT:-6390}
# shellcheck disable=SC1090
source "$ENV_SH"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
W=$OUT/two-node; rm -rf "$W"; mkdir -p "$W/remote-tmp"
if [ -x /tmp/kit-vllm/bin/mkmodel.py ] || [ -f /tmp/kit-vllm/bin/mkmodel.py ]; then
  [ -d /tmp/models/llama-3.2-1b ] || python3 /tmp/kit-vllm/bin/mkmodel.py llama-3.2-1b /tmp/models/llama-3.2-1b >/dev/null
fi
ray_cli() { python3 -m ray.scripts.scripts "$@"; }  # the kit's site may hold no `ray` script
# Ray 2.5x+ turns on token authentication when ~/.ray/auth_token exists, and then every client (the driver
# too) must say so: one mode for the raylets and the driver, with a token made if there is none
export RAY_AUTH_MODE=token
ray_cli get-auth-token --generate >/dev/null
PIDS=()
stop_raylets() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; wait 2>/dev/null; }
nodes_alive() {
  python3 -c "import ray, sys; ray.init(address='127.0.0.1:$PORT', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null
}
{
  trap stop_raylets EXIT  # (in this group: it runs in a subshell of the pipe to tee)
  echo "== $(date -u +%FT%TZ) head (no GPU) and remote (GPU $GPU), port $PORT"
  CUDA_VISIBLE_DEVICES= setsid python3 -m ray.scripts.scripts start --head \
      --port "$PORT" --num-gpus 0 --num-cpus 4 --node-name head --include-dashboard false \
      --disable-usage-stats --block > "$W/ray-head.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 120); do [ "$(nodes_alive)" = 1 ] && break; sleep 1; done
  CUDA_VISIBLE_DEVICES=$GPU TMPDIR=$W/remote-tmp setsid python3 -m ray.scripts.scripts start \
      --address "127.0.0.1:$PORT" --num-gpus 1 --num-cpus 4 --node-name remote \
      --disable-usage-stats --block > "$W/ray-remote.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 120); do [ "$(nodes_alive)" = 2 ] && break; sleep 1; done
  ray_cli status --address "127.0.0.1:$PORT" | sed -n '1,25p'
  echo "== $(date -u +%FT%TZ) study $STUDY"
  python3 -m servetune.optimizer.cli run "$STUDY" --ray-address "127.0.0.1:$PORT" --output-dir "$OUT/run" --no-report
  echo "== $(date -u +%FT%TZ) checks"
  python3 - "$OUT/run" "$W/remote-tmp" <<'PY'
import json, pathlib, sys
run, remote_tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
t = run / "trials" / "0000"
rec = json.loads((t / "trial.json").read_text())
files = sorted(p.name for p in t.iterdir())
log = (t / "engine.log").read_text(errors="replace") if (t / "engine.log").exists() else ""
checks = [
    ("trial completed", rec.get("state") == "complete", rec.get("state"), (rec.get("failure") or {}).get("reason")),
    ("ran on the remote node", rec.get("node", "").startswith("remote"), rec.get("node")),
    ("files came home", {"trial.json", "engine.log"} <= set(files) and any(f.startswith("requests_") for f in files), files),
    ("the engine's log came with them", len(log.splitlines()) > 5, f"{len(log.splitlines())} lines"),
    ("remote scratch cleaned", not any((remote_tmp / "servetune-trials").rglob("trial.json")), str(remote_tmp)),
]
for name, ok, *why in checks:
    print(("PASS " if ok else "FAIL ") + name, *why)
s = rec.get("scenarios", {}).get("server", {}).get("summary", {})
print("server:", {k: s.get(k) for k in ("output_tokens_per_s", "ttft_p99_ms", "tpot_p99_ms", "requests_ok")},
      "ready_s", rec.get("ready_s"), "gpu_ids", rec.get("gpu_ids"), "argv", " ".join(rec.get("argv", [])[:6]))
sys.exit(0 if all(c[1] for c in checks) else 1)
PY
  rc=$?
  echo "== $(date -u +%FT%TZ) done (rc $rc)"
  exit $rc
} 2>&1 | tee -a "$OUT/progress.log"
exit "${PIPESTATUS[0]}"
