"""``headwater report`` and ``headwater analyze``: read a run directory back, verified, and render it.

A run directory is what ``score`` (or ``index query``) writes. ``report``/``analyze`` accept the
run directory itself, or a workdir: its only run, or else the most recent one (and say which).
Everything read is verified: the checksums of scores.safetensors and run.json, the checksum of
results.jsonl recorded in run.json, and the schema of every results row (``report.check_results``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import InputError
from ..storage import json_checksum, load_json, load_tensors
from .common import RUNS, Log, quiet_log, tidy

__all__ = ["render", "resolve_run", "read_run", "read_results", "write_report", "analyze_run"]


def render(results: list[dict], scores: Any, settings: dict, meta: dict, source: str = "results") -> str:
    """The report, with the paper's analyses (``headwater.analysis``) of these scores in it."""
    from ..analysis import analyze, layer_order
    from ..report import render_report

    if scores.per_layer:  # analysis reads layers in model order
        names = meta.get("layers") or layer_order(list(scores.per_layer))
        scores.per_layer = {n: scores.per_layer[n] for n in names if n in scores.per_layer}
    return render_report(results, scores.values, settings, meta, analyze(scores), source=source)


def resolve_run(path: str | Path, log: Log = quiet_log) -> Path:
    """The run directory ``path`` names: itself, or a workdir's only (else most recent) run."""
    from .common import RESULTS_FILE, RUN_FILE, SCORES_FILE

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a run directory written by `headwater score` (or its workdir)")
    if any((path / f).exists() for f in (RUN_FILE, RESULTS_FILE, SCORES_FILE)):
        return path
    runs = sorted((p for p in (path / RUNS).glob("*") if (p / RUN_FILE).exists()), key=lambda p: p.stat().st_mtime)
    if not runs:
        if not (path / "cli.json").exists() and not (path / "config.json").exists():
            raise InputError(f"{path} is not a fitted headwater workdir (no cli.json) and holds no scoring run")
        raise InputError(f"{path} holds no scoring run; run `headwater score --workdir {path} --queries FILE` first")
    if len(runs) > 1:
        log(f"{path} holds {len(runs)} runs; using the most recent, {runs[-1]} (pass a run directory to choose)")
    return runs[-1]


def read_results(path: Path, run: dict) -> list[dict]:
    """The rows of a run's results.jsonl, verified against the checksum that run.json records."""
    if not path.exists():
        raise InputError(f"{path} does not exist; rerun `headwater score`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a flipped byte can leave invalid UTF-8: damage, like any other
        raise InputError(
            f"{path} is not valid UTF-8 (byte {e.start}): it was changed after headwater wrote it; "
            "rerun `headwater score`"
        ) from e
    if run.get("results_checksum") != json_checksum(text):
        raise InputError(
            f"{path} does not match its checksum in run.json: it was changed after headwater wrote it; "
            "rerun `headwater score`"
        )
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                out.append(json.loads(line, parse_constant=_no_constant))
            except (json.JSONDecodeError, ValueError) as e:
                raise InputError(f"{path}, line {n}: not valid JSON ({e}); rerun `headwater score`") from e
    if not out:
        raise InputError(f"{path} holds no results; rerun `headwater score`")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_run(run_dir: Path) -> tuple[dict, list[dict], Any]:
    """(run.json, results rows, Scores) of a run directory, all verified."""
    from ..scoring import Scores
    from .common import RESULTS_FILE, RUN_FILE, SCORES_FILE

    hint = f"rerun `headwater score` (or delete {run_dir})"
    if not (run_dir / RUN_FILE).exists():
        raise InputError(f"{run_dir} has no {RUN_FILE}; rerun `headwater score`, which writes it")
    run = load_json(run_dir / RUN_FILE, hint=hint)
    results = read_results(run_dir / RESULTS_FILE, run)
    spath = run_dir / SCORES_FILE
    if not spath.exists():
        raise InputError(f"{spath} does not exist; {hint}")
    tensors, meta = load_tensors(spath, "scores", hint=hint)
    if "values" not in tensors or tensors["values"].shape[0] != len(results):
        raise InputError(f"{spath} does not match {run_dir / RESULTS_FILE} (query counts differ); {hint}")
    return run, results, Scores.from_tensors(tensors, meta)


def write_report(path: str | Path, out: str | Path | None = None, log: Log = quiet_log) -> Path:
    """Rebuild a run's report.html from its saved files (no model needed).

    The report shows the settings of the fit the run was scored with, as run.json records them
    (the workdir may have been refitted since; its cli.json is read only for runs that predate
    that record). Rewriting the run's own report.html updates its checksum in run.json.
    """
    from ..storage import atomic_write_text, save_json
    from .common import REPORT_FILE, RESULTS_FILE, RUN_FILE, read_settings

    run_dir = resolve_run(path, log)
    tidy(run_dir)
    run, results, scores = read_run(run_dir)
    if isinstance(run.get("fit"), dict):
        settings = dict(run["fit"])
    else:
        workdir = Path(run.get("workdir", run_dir))
        settings = read_settings(workdir) if workdir.exists() else {}
    settings = {**settings, **run.get("settings_override", {})}
    target = Path(out) if out is not None else run_dir / REPORT_FILE
    html = render(results, scores, settings, run, source=str(run_dir / RESULTS_FILE))
    atomic_write_text(target, html)
    if target.resolve() == (run_dir / REPORT_FILE).resolve() and "report_checksum" in run:
        save_json(run_dir / RUN_FILE, {**run, "report_checksum": json_checksum(html)})
    return target


def analyze_run(path: str | Path, log: Log = quiet_log, **kwargs: Any) -> dict:
    """``headwater.analysis.analyze_workdir`` on a verified run directory; writes its analysis.json."""
    from ..analysis import analyze_workdir
    from ..storage import save_json, tensors_meta
    from .common import ANALYSIS_FILE, RUN_FILE, SCORES_FILE

    run_dir = resolve_run(path, log)
    tidy(run_dir)
    if (run_dir / RUN_FILE).exists():
        read_run(run_dir)  # verify everything before analyzing (scores.safetensors is verified either way)
    res = analyze_workdir(run_dir, **kwargs)
    # which scores this analysis describes: `verify` flags it once they are replaced
    res["scores_checksum"] = tensors_meta(run_dir / SCORES_FILE)[1]
    save_json(run_dir / ANALYSIS_FILE, res)
    return res
