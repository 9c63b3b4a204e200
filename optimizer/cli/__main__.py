"""``python -m servetune.optimizer.cli ...``: the same as ``servetune ...``."""
import sys

from servetune.optimizer.cli import main

sys.exit(main())
