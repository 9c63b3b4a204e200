"""``python -m servetune.optimizer.engines.sim --model llama-3.1-8b --port 8000 ...`` (flags: ``--help``)."""
import sys

from servetune.optimizer.engines.sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
