#!/usr/bin/env bash
# On a GPU host with no network: install an engine from gpu-kit parts, servetune's extra wheels, and model
# checkpoints of real shapes (random weights). Usage: host_setup.sh ENGINE
#   ENGINE: vllm | sglang
# Parts arrive one per device call (64 MiB each); after each run, with KIT_HOME=/tmp/kit-ENGINE:
#   bash KITDIR/p_partNN/recv.sh KITDIR   (engine parts)   and   bash EXTRADIR/x_partNN/recv.sh EXTRADIR
# (servetune's own wheels: ray, optuna, plotly, ...; install.sh installs them with the engine).
set -euo pipefail
ENGINE=${1:?engine}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export KIT_HOME=/tmp/kit-$ENGINE SITE=/tmp/site-$ENGINE
# servetune's wheels arrive once per host: a second engine's kit reuses the first one's
if ! ls "$KIT_HOME"/xwheels/*.whl* >/dev/null 2>&1; then
  for other in /tmp/kit-*/xwheels; do ls "$other"/*.whl* >/dev/null 2>&1 && mkdir -p "$KIT_HOME/xwheels" && cp "$other"/* "$KIT_HOME/xwheels/" && break; done
fi
bash "$KIT_HOME/bin/install.sh"


# servetune itself without pip (no build backend offline): a copy of this checkout that outlives the
# command, and the namespace servetune.* as symlinks into it
# (one per engine: setting up the second engine must not pull files from under a study of the first)
SRC=/tmp/servetune-src-$ENGINE ST=/tmp/st-$ENGINE
rm -rf "$SRC" "$ST" && mkdir -p "$SRC" && tar -C "$REPO" --exclude=.gpukit --exclude=.git -cf - . | tar -C "$SRC" -xf -
mkdir -p "$ST/servetune"
for d in optimizer loadgen reports search_spaces deploy_templates; do ln -sfn "$SRC/$d" "$ST/servetune/$d"; done
cat > "$KIT_HOME/servetune-env.sh" <<ENV
source $KIT_HOME/env.sh
export PYTHONPATH=$ST:\$PYTHONPATH RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ENV
source "$KIT_HOME/servetune-env.sh"
for m in llama-3.1-8b llama-3.1-70b mixtral-8x7b; do
  [ -d "/tmp/models/$m" ] || python3 "$KIT_HOME/bin/mkmodel.py" "$m" "/tmp/models/$m" >/dev/null
done
python3 -c "import servetune.optimizer.driver, ray, optuna, plotly; print('servetune ready; ray', ray.__version__, 'optuna', optuna.__version__)"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
