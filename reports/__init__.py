"""Reports of a study's run directory: the trial table, Pareto fronts, the HTML report, comparisons and the
local report server (``servetune.reports.serve``)."""
from servetune.reports.compare import write_compare
from servetune.reports.html import write_report
from servetune.reports.model import Run, load_run

__all__ = ["Run", "load_run", "write_report", "write_compare"]
