import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (study_fixtures, loadgen_mock, ...) import by name
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
