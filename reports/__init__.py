"""Reports of a study's run directory: the trial table, Pareto fronts and the HTML report."""
from servetune.reports.html import write_report
from servetune.reports.model import Run, load_run

__all__ = ["Run", "load_run", "write_report"]
