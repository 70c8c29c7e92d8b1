"""Workflows on workdirs: what the commands do, callable from Python (the demo and the tests use them).

fit_workdir(model, data, workdir)              # headwater fit
score_workdir(workdir, queries)                # headwater score  -> a run directory
write_report(run_or_workdir)                   # headwater report
analyze_run(run_or_workdir)                    # headwater analyze
inspect_workdir(workdir), verify_workdir(workdir)
build_workdir_index(workdir), query_workdir_index(workdir, queries)
"""

from .common import CLI_FILE, RESULTS_FILE, RUN_FILE, RUNS, SCORES_FILE, Log, parse_modules, read_settings, reopen
from .fit import MAX_FACTOR_SIDE, factor_table, fit_workdir
from .index import build_workdir_index, index_agreement, query_workdir_index
from .inspect import Finding, format_findings, format_inspect, inspect_workdir, verify_workdir
from .outputs import analyze_run, read_run, render, resolve_run, write_report
from .score import build_results, score_workdir

__all__ = [
    "CLI_FILE",
    "RUNS",
    "Log",
    "parse_modules",
    "read_settings",
    "reopen",
    "MAX_FACTOR_SIDE",
    "factor_table",
    "fit_workdir",
    "build_workdir_index",
    "index_agreement",
    "query_workdir_index",
    "Finding",
    "format_findings",
    "format_inspect",
    "inspect_workdir",
    "verify_workdir",
    "analyze_run",
    "read_run",
    "render",
    "resolve_run",
    "write_report",
    "RESULTS_FILE",
    "RUN_FILE",
    "SCORES_FILE",
    "build_results",
    "score_workdir",
]
