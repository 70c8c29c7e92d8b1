"""``headwater inspect`` (what a workdir holds) and ``headwater verify`` (is all of it intact and current)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import InputError
from ..storage import CorruptArtifactError, load_json, load_tensors, tensors_meta
from ..workdir import CHECKPOINTS, CONFIG_FILE, COVARIANCE_FILE, FACTORS_FILE, SCORES
from .common import CLI_FILE, RUNS

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
        lam = factors.get(f"{name}::lam", factors.get(f"{name}::diag"))
        if lam is not None:
            layer["eigenvalues"] = _spectrum(lam)
        info["layers"].append(layer)
    for run in sorted((workdir / RUNS).glob("*/run.json")) if (workdir / RUNS).is_dir() else []:
        try:
            r = load_json(run)
            info["runs"].append(
                {
                    "path": str(run.parent),
                    "queries": r.get("n_queries"),
                    "n_train": r.get("n_train"),
                    "created": r.get("created"),
                    "query_rank": r.get("query_rank"),
                }
            )
        except (OSError, ValueError):
            info["runs"].append({"path": str(run.parent), "damaged": True})
    for p in sorted(workdir.iterdir()):
        if not p.name.startswith("."):
            info["files"][p.name + ("/" if p.is_dir() else "")] = _size(p)
    return info


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
    lines.append(f"layers    {len(info['layers'])} (model order)")
    cols = ("min", "median", "mean", "max", "damping")
    lines.append(
        f"  {'layer':<34} {'O x I':>11} " + " ".join(f"{c:>9}" for c in cols) + f" {'<damp':>6} {'eff.rank':>8}"
    )
    for layer in info["layers"]:
        shape = f"{layer['shape'][0]}x{layer['shape'][1]}"
        ev = layer.get("eigenvalues")
        if ev is None:
            lines.append(f"  {layer['name']:<34} {shape:>11}   (not fitted)")
            continue
        lines.append(
            f"  {layer['name']:<34} {shape:>11} {ev['min']:>9.2e} {ev['median']:>9.2e} {ev['mean']:>9.2e} "
            f"{ev['max']:>9.2e} {ev['damping']:>9.2e} {ev['below_damping']:>6.0%} {ev['effective_rank']:>8.1f}"
        )
    for run in info["runs"]:
        lines.append(
            f"run       {run['path']}  ({run.get('queries')} queries x {run.get('n_train')} documents, "
            f"{run.get('created')})"
            if not run.get("damaged")
            else f"run       {run['path']}  (damaged)"
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


def _check(findings: list[Finding], path: Path, read: Any, fix: str) -> Any:
    try:
        value = read(path)
    except (CorruptArtifactError, InputError, OSError, ValueError, KeyError) as e:
        findings.append(Finding("corrupt", str(path), f"{' '.join(str(e).split())} -> {fix}"))
        return None
    findings.append(Finding("ok", str(path)))
    return value


def verify_workdir(workdir: str | Path) -> list[Finding]:
    """Check every artifact of a workdir against its checksum and against the settings it derives from."""
    from ..data import fingerprint
    from ..index import CorruptIndexError, GradientIndex
    from ..io import read_documents
    from .outputs import read_run

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise InputError(f"workdir {workdir} does not exist")
    out: list[Finding] = []
    refit = "refit with `headwater fit --overwrite`"
    config = (
        _check(out, workdir / CONFIG_FILE, load_json, f"delete {workdir} and refit")
        if (workdir / CONFIG_FILE).exists()
        else None
    )
    if config is None and not (workdir / CONFIG_FILE).exists():
        out.append(Finding("missing", str(workdir / CONFIG_FILE), "not a headwater workdir; run `headwater fit`"))
    settings = _check(out, workdir / CLI_FILE, load_json, refit) if (workdir / CLI_FILE).exists() else None
    fmeta = None
    if (workdir / FACTORS_FILE).exists():
        got = _check(out, workdir / FACTORS_FILE, lambda p: load_tensors(p, "factors"), refit)
        fmeta = got[1] if got else None
    elif config is not None and config.get("strategy") != "identity":
        out.append(Finding("missing", str(workdir / FACTORS_FILE), "not fitted yet: run `headwater fit`"))
    if fmeta is not None and config is not None:
        same = {k: fmeta.get(k) for k in ("model", "task", "strategy", "fisher", "seed", "modules")}
        if same != {k: config.get(k) for k in same}:
            out.append(
                Finding("stale", str(workdir / FACTORS_FILE), f"fitted for other settings than config.json; {refit}")
            )
    if fmeta is not None and settings and settings.get("data") and Path(settings["data"]).exists():
        try:
            if fingerprint(read_documents(settings["data"])) != fmeta.get("fit_data"):
                out.append(
                    Finding(
                        "stale",
                        str(workdir / FACTORS_FILE),
                        f"the data file {settings['data']} changed since the fit; {refit}",
                    )
                )
        except InputError as e:
            out.append(Finding("corrupt", settings["data"], str(e)))
    if (workdir / COVARIANCE_FILE).exists():
        _check(out, workdir / COVARIANCE_FILE, lambda p: load_tensors(p, "covariance"), f"delete it or {refit}")
    for sub in (SCORES, CHECKPOINTS):
        for f in sorted((workdir / sub).rglob("*.safetensors")) if (workdir / sub).is_dir() else []:
            _check(out, f, load_tensors, f"delete {f}")
    factors = tensors_meta(workdir / FACTORS_FILE)[1] if fmeta is not None else None
    for run_dir in sorted(p.parent for p in (workdir / RUNS).glob("*/run.json")) if (workdir / RUNS).is_dir() else []:
        run = _check(out, run_dir, lambda p: read_run(p)[0], f"rerun `headwater score` or delete {run_dir}")
        if run is not None and run.get("factors") not in (None, factors):
            out.append(
                Finding("stale", str(run_dir), f"scored with other factors than the workdir holds; delete {run_dir}")
            )
    index = workdir / "index"
    if (index / "manifest.json").exists():
        try:
            GradientIndex.open(index, verify=True)
            out.append(Finding("ok", str(index)))
        except (CorruptIndexError, CorruptArtifactError, ValueError, OSError) as e:
            out.append(Finding("corrupt", str(index), f"{' '.join(str(e).split())}"))
    return out


def format_findings(findings: list[Finding]) -> str:
    bad = [f for f in findings if f.status != "ok"]
    lines = [f"{f.status.upper():<8} {f.path}" + (f": {f.detail}" if f.detail else "") for f in findings]
    lines.append(f"{len(findings) - len(bad)} ok, {len(bad)} with problems")
    return "\n".join(lines)
