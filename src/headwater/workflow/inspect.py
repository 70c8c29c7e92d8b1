"""``headwater inspect`` (what a workdir holds) and ``headwater verify`` (is all of it intact and current).

``inspect`` describes: a damaged run is listed as damaged, with the file and what to do, and
the command still succeeds. ``verify`` judges: every artifact is read in full and checked
against its checksum and against what it was derived from (the factors against config.json
and the data file, each run against the factors and the data, analysis.json against its run's
scores, the index against the factors and the data); it exits 1 if anything is not "ok".
Both first remove dead writers' temporary files (``common.tidy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import InputError
from ..storage import CorruptArtifactError, load_json, load_tensors, tensors_meta
from ..workdir import CHECKPOINTS, CONFIG_FILE, COVARIANCE_FILE, FACTORS_FILE, SCORES
from .common import (
    ANALYSIS_FILE,
    CLI_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    RUN_FILE,
    RUNS,
    SCORES_FILE,
    calibration_summary,
    tidy,
)

__all__ = ["inspect_workdir", "format_inspect", "verify_workdir", "Finding", "format_findings"]


def _order(config: dict) -> list[str]:
    """Layer names in model order (config.json's ``layers``; else natural order of the names)."""
    from ..analysis import layer_order

    names = config.get("layers") or list(config.get("modules") or {})
    return names if config.get("layers") else layer_order(names)


def _spectrum(lam: Any) -> dict:
    from ..curvature import DAMPING_SCALE

    lam = lam.double().flatten()
    mean = lam.mean().item()
    damp = DAMPING_SCALE * mean
    sq = (lam * lam).sum().item()
    return {
        "min": lam.min().item(),
        "median": lam.median().item(),
        "mean": mean,
        "max": lam.max().item(),
        "damping": damp,
        "below_damping": (lam < damp).double().mean().item(),
        # participation ratio: how many eigen-directions carry the curvature
        "effective_rank": (lam.sum().item() ** 2 / sq) if sq > 0 else 0.0,
        "condition": (lam.max() / (lam.min() + damp)).item() if damp > 0 else math.inf,
    }


def inspect_workdir(workdir: str | Path) -> dict:
    """What a workdir holds, from its files alone: settings, per-layer spectra, data, runs, sizes."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError(f"workdir {workdir} does not exist; pass a directory made by `headwater fit`")
    tidy(workdir)
    if not (workdir / CONFIG_FILE).exists():
        raise InputError(
            f"{workdir} is not a headwater workdir (no config.json); pass a directory made by `headwater fit`"
        )
    config = load_json(workdir / CONFIG_FILE, hint=f"delete {workdir} and refit")
    settings = load_json(workdir / CLI_FILE, hint="refit with --overwrite") if (workdir / CLI_FILE).exists() else {}
    info: dict[str, Any] = {
        "workdir": str(workdir.resolve()),
        "model": {
            "path": settings.get("model") or config.get("model_path"),
            "class": (config.get("model") or {}).get("class"),
            "fingerprint": (config.get("model") or {}).get("fingerprint"),
            "fitted_from": "command line" if settings else "Python",
        },
        "tokenizer": settings.get("tokenizer"),
        **{k: config.get(k) for k in ("strategy", "fisher", "top", "seed", "headwater")},
        "samples": config.get("samples", 1),
        "max_length": settings.get("max_length"),
        "data": {
            k: settings.get(s)
            for k, s in (
                ("path", "data"),
                ("sha256", "data_sha256"),
                ("fingerprint", "data_fingerprint"),
                ("n_train", "n_train"),
            )
        },
        "layers": [],
        "fitted": config.get("strategy") == "identity",
        "runs": [],
        "files": {},
    }
    factors: dict = {}
    if (workdir / FACTORS_FILE).exists():
        factors, fmeta = load_tensors(workdir / FACTORS_FILE, "factors", hint="refit with --overwrite")
        info.update(fitted=True, fitted_at=fmeta.get("created"))
        info["data"]["fit_fingerprint"] = fmeta.get("fit_data")
    modules = config.get("modules") or {}
    for name in _order(config):
        kind, out_f, in_f = modules[name]
        layer: dict[str, Any] = {"name": name, "kind": kind, "shape": [out_f, in_f], "params": out_f * in_f}
        layer["role"] = ((settings.get("layer_kinds") or {}).get(name) or {}).get("kind")  # attention, mlp, expert...
        lam = factors.get(f"{name}::lam", factors.get(f"{name}::diag"))
        if lam is not None:
            layer["eigenvalues"] = _spectrum(lam)
        info["layers"].append(layer)
    if settings.get("coverage"):
        info["coverage"] = settings["coverage"]
    calibration = calibration_summary(workdir)
    if calibration is not None:
        info["calibration"] = calibration
    for run_dir in run_dirs(workdir):
        info["runs"].append(_run_summary(run_dir))
    for p in sorted(workdir.iterdir()):
        if not p.name.startswith("."):
            info["files"][p.name + ("/" if p.is_dir() else "")] = _size(p)
    return info


def run_dirs(workdir: Path) -> list[Path]:
    """The run directories of a workdir: ``results/*`` and the workdir itself when ``--out`` was it."""
    runs = [workdir] if any((workdir / f).exists() for f in (RUN_FILE, RESULTS_FILE, SCORES_FILE)) else []
    if (workdir / RUNS).is_dir():
        runs += sorted(p for p in (workdir / RUNS).iterdir() if p.is_dir())
    return runs


def _run_summary(run_dir: Path) -> dict:
    """One run for ``inspect``, from run.json and the header of scores.safetensors (not the tensors).

    A damaged or incomplete run is listed with the message that names the file and what to
    do; reading every byte is ``verify``'s job.
    """
    hint = f"rerun `headwater score`, or delete {run_dir}"
    try:
        if not (run_dir / RUN_FILE).exists():
            raise InputError(f"{run_dir / RUN_FILE} is missing (the run did not finish); {hint}")
        r = load_json(run_dir / RUN_FILE, hint=hint)
        if not (run_dir / SCORES_FILE).exists():
            raise InputError(f"{run_dir / SCORES_FILE} is missing; {hint}")
        tensors_meta(run_dir / SCORES_FILE, hint=hint)
    except (OSError, ValueError) as e:
        return {"path": str(run_dir), "damaged": " ".join(str(e).split())}
    return {
        "path": str(run_dir),
        "queries": r.get("n_queries"),
        "n_train": r.get("n_train"),
        "created": r.get("created"),
        "query_rank": r.get("query_rank"),
    }


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_inspect(info: dict) -> str:
    m = info["model"]
    lines = [f"workdir   {info['workdir']}"]
    lines.append(
        f"model     {m.get('path') or '(not recorded)'}  ({m.get('class')}, fingerprint {m.get('fingerprint')}, "
        f"fitted from the {m.get('fitted_from')})"
    )
    if info.get("tokenizer") and info["tokenizer"] != m.get("path"):
        lines.append(f"tokenizer {info['tokenizer']}")
    lines.append(
        f"strategy  {info['strategy']}  fisher={info['fisher']}"
        + (f" (top {info['top']})" if info.get("top") else "")
        + (f"  samples={info['samples']}" if info.get("samples", 1) != 1 else "")
        + f"  seed={info['seed']}  max_length={info.get('max_length')}  headwater {info.get('headwater')}"
    )
    d = info["data"]
    lines.append(
        f"data      {d.get('path') or '?'}  ({d.get('n_train')} documents, sha256 {d.get('sha256')}, "
        f"fingerprint {d.get('fingerprint')})"
    )
    lines.append(f"fitted    {('at ' + str(info.get('fitted_at'))) if info['fitted'] else 'no (run headwater fit)'}")
    cal = info.get("calibration")
    if cal:
        from ..report import calibration_text

        stale = "" if cal.get("current") else "; STALE: made for other factors, rerun `headwater calibrate`"
        lines.append(f"damping   calibrated {calibration_text(cal)}{stale}")
    roles: dict[str, int] = {}
    for layer in info["layers"]:
        roles[layer.get("role") or "?"] = roles.get(layer.get("role") or "?", 0) + 1
    by = ", ".join(f"{n} {r}" for r, n in roles.items()) if set(roles) != {"?"} else "kinds not recorded"
    lines.append(f"layers    {len(info['layers'])} in model order ({by})")
    cov = info.get("coverage")
    if cov:
        lines.append(
            f"coverage  {cov['share']:.1%} of all parameters, {cov['attributable_share']:.1%} of the weight matrices "
            "attribution should cover (embeddings and vectors excluded)"
        )
        for u in cov.get("untracked") or []:
            lines.append(f"  not tracked: {u['name']} ({u['numel']:,} entries): {u['reason']}")
    cols = ("min", "median", "mean", "max", "damping")
    lines.append(
        f"  {'layer':<34} {'kind':<13} {'O x I':>11} "
        + " ".join(f"{c:>9}" for c in cols)
        + f" {'<damp':>6} {'eff.rank':>8}"
    )
    for layer in info["layers"]:
        shape = f"{layer['shape'][0]}x{layer['shape'][1]}"
        ev = layer.get("eigenvalues")
        role = layer.get("role") or ""
        if ev is None:
            lines.append(f"  {layer['name']:<34} {role:<13} {shape:>11}   (not fitted)")
            continue
        lines.append(
            f"  {layer['name']:<34} {role:<13} {shape:>11} {ev['min']:>9.2e} {ev['median']:>9.2e} {ev['mean']:>9.2e} "
            f"{ev['max']:>9.2e} {ev['damping']:>9.2e} {ev['below_damping']:>6.0%} {ev['effective_rank']:>8.1f}"
        )
    for run in info["runs"]:
        lines.append(
            f"run       {run['path']}  ({run.get('queries')} queries x {run.get('n_train')} documents, "
            f"{run.get('created')})"
            if not run.get("damaged")
            else f"run       {run['path']}  (damaged: {run['damaged']})"
        )
    lines.append("files")
    for name, size in info["files"].items():
        lines.append(f"  {name:<28} {_human(size):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One artifact's state: "ok", "corrupt", "stale" or "missing"; what is wrong and what to do."""

    status: str
    path: str
    detail: str = ""


def _check(findings: list[Finding], path: Path, read: Any) -> Any:
    """``read(path)``, recording "ok" or "corrupt" with the reader's message (which names the file
    and says what to do); None when it failed."""
    try:
        value = read(path)
    except (CorruptArtifactError, InputError, OSError, ValueError, KeyError, TypeError) as e:
        findings.append(Finding("corrupt", str(path), " ".join(str(e).split())))
        return None
    findings.append(Finding("ok", str(path)))
    return value


def _data_fingerprint(findings: list[Finding], settings: dict | None) -> str | None:
    """Fingerprint of the data file cli.json records (None if there is none); a missing or
    unreadable one is a finding: score and index build read it."""
    from ..data import fingerprint
    from ..io import read_documents

    path = (settings or {}).get("data")
    if not path:
        return None
    if not Path(path).exists():
        findings.append(
            Finding("missing", str(path), "the training data recorded at fit time is gone; pass --data FILE to score")
        )
        return None
    try:
        return fingerprint(read_documents(path, (settings or {}).get("task", "causal-lm")))
    except InputError as e:
        findings.append(Finding("corrupt", str(path), " ".join(str(e).split())))
        return None


def _verify_run(out: list[Finding], run_dir: Path, factors: str | None, data: tuple[str, str] | None) -> None:
    """One run directory: each file against its checksum, then the run against the factors and data.

    ``factors`` is the checksum of the workdir's intact factors (None: unknown, so not compared),
    ``data`` the (path, fingerprint) of the intact data file cli.json records.
    """
    from ..storage import json_checksum
    from .outputs import read_results

    hint = f"rerun `headwater score`, or delete {run_dir}"
    files = {name: run_dir / name for name in (RUN_FILE, RESULTS_FILE, SCORES_FILE, REPORT_FILE)}
    missing = [name for name in (RUN_FILE, RESULTS_FILE, SCORES_FILE) if not files[name].exists()]
    for name in missing:
        out.append(Finding("missing", str(files[name]), f"the run is incomplete; {hint}"))
    if RUN_FILE in missing:
        return
    run = _check(out, files[RUN_FILE], lambda p: load_json(p, hint=hint))
    if run is None:
        return  # the checksums of the other files are recorded in it
    rows = _check(out, files[RESULTS_FILE], lambda p: read_results(p, run)) if RESULTS_FILE not in missing else None
    if SCORES_FILE not in missing:
        got = _check(out, files[SCORES_FILE], lambda p: load_tensors(p, "scores", hint=hint))
        values = got[0].get("values") if got is not None else None
        if got is not None and rows is not None and (values is None or values.shape[0] != len(rows)):
            out.append(Finding("corrupt", str(files[SCORES_FILE]), f"holds other queries than {RESULTS_FILE}; {hint}"))
    if "report_checksum" in run:
        redo = f"rebuild it with `headwater report {run_dir}`"
        report = files[REPORT_FILE]
        if not report.exists():
            out.append(Finding("missing", str(report), redo))
        elif json_checksum(report.read_text(encoding="utf-8", errors="replace")) != run["report_checksum"]:
            out.append(Finding("corrupt", str(report), f"{report} does not match its checksum in {RUN_FILE}; {redo}"))
        else:
            out.append(Finding("ok", str(report)))
    if factors is not None and run.get("factors") not in (None, factors):
        out.append(Finding("stale", str(run_dir), f"scored with factors the workdir no longer holds; {hint}"))
    elif data is not None and run.get("data") == data[0] and run.get("data_fingerprint") not in (None, data[1]):
        out.append(Finding("stale", str(run_dir), f"the data file {data[0]} changed since this run; {hint}"))
    analysis = run_dir / ANALYSIS_FILE
    if analysis.exists() and files[SCORES_FILE].exists():
        redo = f"rerun `headwater analyze {run_dir}`"
        saved = _check(out, analysis, lambda p: load_json(p, hint=redo))
        try:
            current = tensors_meta(files[SCORES_FILE])[1]
        except (OSError, ValueError):
            current = None  # already reported above
        recorded = saved.get("scores_checksum") if saved is not None else None  # None: written before it was
        if recorded is not None and current is not None and recorded != current:
            out.append(Finding("stale", str(analysis), f"describes other scores than {SCORES_FILE}; {redo}"))


def _verify_index(out: list[Finding], index: Path, factors: str | None, data: str | None) -> None:
    """The workdir's index: its files against the manifest, its provenance against the factors and data."""
    from ..index import MANIFEST, CorruptIndexError, GradientIndex
    from .index import SOURCE_FILE

    redo = "rebuild it with `headwater index build --overwrite`"
    if not (index / MANIFEST).exists():
        if any(index.glob("shard-*")):
            out.append(Finding("missing", str(index / MANIFEST), f"the index has shards but no manifest; {redo}"))
        return
    try:
        idx = GradientIndex.open(index, verify=True)
        source = load_json(index / SOURCE_FILE, hint=redo) if (index / SOURCE_FILE).exists() else None
    except (CorruptIndexError, CorruptArtifactError, ValueError, OSError) as e:
        out.append(Finding("corrupt", str(index), " ".join(str(e).split())))
        return
    out.append(Finding("ok", str(index)))
    if factors is not None and source is not None and source.get("factors") != factors:
        out.append(Finding("stale", str(index), f"built from factors the workdir no longer holds; {redo}"))
    elif data is not None and idx.manifest.get("data_fingerprint") != data:
        out.append(
            Finding("stale", str(index), f"built from other data than the file the workdir was fitted on; {redo}")
        )


def verify_workdir(workdir: str | Path) -> list[Finding]:
    """Check every artifact of a workdir against its checksum and against the settings it derives from.

    Each problem is reported once, at the artifact that has it: a run is judged stale only
    against intact factors (damaged factors are one finding, not one per run).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError(f"workdir {workdir} does not exist")
    tidy(workdir)
    out: list[Finding] = []
    refit = f"refit with `headwater fit --overwrite --workdir {workdir} ...`"
    config = None
    if (workdir / CONFIG_FILE).exists():
        config = _check(out, workdir / CONFIG_FILE, lambda p: load_json(p, hint=f"delete {workdir} and refit"))
    else:
        out.append(Finding("missing", str(workdir / CONFIG_FILE), "not a headwater workdir; run `headwater fit`"))
    settings = None
    if (workdir / CLI_FILE).exists():
        settings = _check(out, workdir / CLI_FILE, lambda p: load_json(p, hint=refit))
    data_fp = _data_fingerprint(out, settings)
    fmeta = factors = None
    if (workdir / FACTORS_FILE).exists():
        got = _check(out, workdir / FACTORS_FILE, lambda p: load_tensors(p, "factors", hint=refit))
        if got is not None:
            fmeta, factors = got[1], tensors_meta(workdir / FACTORS_FILE)[1]
    elif config is not None and config.get("strategy") != "identity":
        out.append(Finding("missing", str(workdir / FACTORS_FILE), "not fitted yet: run `headwater fit`"))
    stale_factors = None
    if fmeta is not None and config is not None:
        same = {k: fmeta.get(k) for k in ("model", "task", "strategy", "fisher", "seed", "modules")}
        if same != {k: config.get(k) for k in same}:
            stale_factors = f"fitted for other settings than {CONFIG_FILE}; {refit}"
    if fmeta is not None and data_fp is not None and data_fp != fmeta.get("fit_data"):
        stale_factors = f"the data file {settings['data']} changed since the fit; {refit}"
    if stale_factors:
        out.append(Finding("stale", str(workdir / FACTORS_FILE), stale_factors))
    if (workdir / COVARIANCE_FILE).exists():
        hint = f"delete it, or {refit}"
        _check(out, workdir / COVARIANCE_FILE, lambda p: load_tensors(p, "covariance sums", hint=hint))
    for sub, what, hint in (
        (SCORES, "cached scores", "delete it to recompute"),
        (CHECKPOINTS, "checkpoint of an interrupted pass", "delete it (the pass then restarts)"),
    ):
        for f in sorted((workdir / sub).rglob("*.safetensors")) if (workdir / sub).is_dir() else []:
            _check(out, f, lambda p, w=what, h=hint: load_tensors(p, w, hint=h))
    data = (settings["data"], data_fp) if data_fp is not None else None
    for run_dir in run_dirs(workdir):  # factors None (missing or damaged): runs are not judged against them
        _verify_run(out, run_dir, factors, data)
    if (workdir / "index").is_dir():
        _verify_index(out, workdir / "index", factors, data_fp)
    return out


def format_findings(findings: list[Finding]) -> str:
    bad = [f for f in findings if f.status != "ok"]
    lines = [f"{f.status.upper():<8} {f.path}" + (f": {f.detail}" if f.detail else "") for f in findings]
    lines.append(f"{len(findings) - len(bad)} ok, {len(bad)} with problems")
    return "\n".join(lines)
