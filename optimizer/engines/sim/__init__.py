"""The simulated engine: an OpenAI-compatible server timed by the performance model (``server``), its
replicas' real-time loop (``replica``), its command line (``cli``), its scheduler (``scheduler``), its
in-process estimate (``estimate``) and its adapter (``engine``)."""
from servetune.optimizer.engines.sim import engine as engine  # registers "sim"
