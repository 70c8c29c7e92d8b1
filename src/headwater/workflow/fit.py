"""``headwater fit``: a local model and a data file in, fitted factors in a workdir out."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ExampleError
from ..io import InputError
from ..storage import load_json, save_json
from ..validation import check_choice
from ..workdir import CHECKPOINTS, CONFIG_FILE, COVARIANCE_FILE, FACTORS_FILE, WorkdirMismatchError
from .common import (
    CLI_FILE,
    CLI_SCHEMA,
    RUNS,
    Log,
    at_location,
    cli_mismatch,
    located_warnings,
    make_task,
    now,
    parse_modules,
)

__all__ = ["fit_workdir", "factor_table", "MAX_FACTOR_SIDE"]

# The largest factor side fitted without --allow-large: an 8192 x 8192 float64 eigendecomposition
# takes minutes on a CPU and 512 MiB; GPT-2's 50k-vocabulary lm_head would need 20 GB and hours.
MAX_FACTOR_SIDE = 8192
# The estimators the command line offers: "exact" needs a task with few outputs, never a language model.
FISHERS = ("auto", "topk", "importance", "sampled", "empirical")
# cli.json entries that describe how the factors were fitted: a fit that reuses them keeps these.
FIT_RUNTIME = ("created", "batch_size", "device", "fit_seconds", "headwater")


def factor_table(an: Any) -> tuple[list[dict], int]:
    """Per tracked layer: its factor sides and float64 bytes; and the total bytes of factors.safetensors."""
    rows, total = [], 0
    kfac = an.strategy in ("kfac", "ekfac")
    for name, (o, i) in an.shapes.items():
        size = 8 * ((i * i + o * o + o * i) if kfac else o * i if an.strategy == "diagonal" else 0)
        rows.append({"name": name, "out": o, "in": i, "bytes": size})
        total += size
    return rows, total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _check_sizes(an: Any, allow_large: bool, max_side: int, log: Log) -> None:
    """Print each layer's factor sizes and refuse factors too large to eigendecompose quickly."""
    rows, total = factor_table(an)
    if an.strategy in ("kfac", "ekfac"):
        big = [r for r in rows if max(r["in"], r["out"]) > max_side]
        shown = rows if len(rows) <= 8 else rows[:6] + [{"name": f"... {len(rows) - 7} more"}] + rows[-1:]
        for r in shown:
            if "out" in r:
                log(f"  {r['name']:<40} A {r['in']}x{r['in']}  S {r['out']}x{r['out']}  {_human(r['bytes'])}")
            else:
                log(f"  {r['name']}")
        if big and not allow_large:
            b = max(big, key=lambda r: max(r["in"], r["out"]))
            raise InputError(
                f"layer {b['name']!r} has a {max(b['in'], b['out'])}-wide Kronecker factor (limit {max_side}): its "
                "eigendecomposition would take very long and much memory; pass --modules mlp or a list of layers, "
                "or --allow-large to fit it anyway"
            )
    log(f"factors: {_human(total)} on disk and in memory ({len(rows)} layers)")


def _load(
    model: Path, tokenizer: Path, data: Path, task: str, device: str, dtype: str, max_length: int | None
) -> tuple[list, Any, Any, int]:
    """The documents, model and tokenizer, and ``max_length`` checked against the context length."""
    from ..io import context_length, load_model, load_tokenizer, read_documents

    docs = read_documents(data, task)
    net = load_model(model, device=device, dtype=dtype, task=task)
    tok = load_tokenizer(tokenizer)
    ctx = context_length(net)
    if max_length is None:
        max_length = ctx
    elif max_length > ctx:
        raise InputError(f"--max-length {max_length} exceeds the model's context length {ctx}; pass at most {ctx}")
    return docs, net, tok, max_length


def _reset(workdir: Path) -> None:
    """Remove what headwater wrote in a workdir (for --overwrite), nothing else."""
    from ..workdir import DERIVED, SCORES

    for name in (CONFIG_FILE, FACTORS_FILE, COVARIANCE_FILE, CLI_FILE, *DERIVED):
        p = workdir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    for name in (CHECKPOINTS, SCORES, RUNS, "partial"):
        shutil.rmtree(workdir / name, ignore_errors=True)


def _previous(workdir: Path) -> dict | None:
    """The cli.json of a workdir that already holds factors, else None."""
    prev_path = workdir / CLI_FILE
    if not (workdir / FACTORS_FILE).exists() or not prev_path.exists():
        return None
    return load_json(prev_path, hint=f"pass --overwrite to refit into {workdir}")


def _check_previous(
    prev: dict | None,
    workdir: Path,
    max_length: int,
    tok_hash: str,
    fp: str,
    dtype: str,
    model_dtype: str,
    kind: str = "causal-lm",
    fit_examples: int | None = None,
) -> None:
    """A workdir fitted with another truncation, tokenizer, precision or data needs --overwrite.

    The precision is compared as loaded (``model_dtype``), so ``--dtype auto`` on a float32
    checkpoint matches a float32 fit; bf16 and fp32 weights have the same model fingerprint,
    so without this check a bf16 fit would silently reuse float32 factors.
    """
    if prev is None:
        return
    checks = [("task", kind), ("max_length", max_length), ("tokenizer_sha256", tok_hash)]
    checks.append(("fit_examples", fit_examples))
    checks.append(("model_dtype", model_dtype) if "model_dtype" in prev else ("dtype", dtype))
    changed = [f"{k}={prev.get(k)!r} (now {v!r})" for k, v in checks if k in prev and prev[k] != v]
    if changed:
        raise InputError(
            f"workdir {workdir} was fitted with {', '.join(changed)}; pass --overwrite to refit, or use a new workdir"
        )
    if prev.get("data_fingerprint") not in (None, fp):
        raise InputError(
            f"workdir {workdir} already holds factors fitted on other data (fingerprint "
            f"{prev.get('data_fingerprint')}, this data {fp}); pass --overwrite to refit, or use a new workdir"
        )


def _tracked(model: Any, layers: dict) -> dict:
    """What ``inspect`` and the report show about the selection: each layer's kind and the share covered."""
    from ..layers import coverage, describe_layers

    cov = coverage(model, layers)
    kinds = {
        row["name"]: {k: row[k] for k in ("kind", "params", "share", "expert", "block") if k in row}
        for row in describe_layers(model, layers)
    }
    from ..layers import supported_layers

    supported = set(supported_layers(model))
    untracked = []
    for u in cov["untracked"]:
        if u.get("warn"):
            module = u["name"].rsplit(".", 1)[0]
            reason = "trackable, not selected by --modules" if module in supported else u["reason"]
            untracked.append({"name": u["name"], "numel": u["numel"], "reason": reason})
    return {
        "layer_kinds": kinds,
        "coverage": {
            "share": cov["share"],
            "attributable_share": cov["attributable_share"],
            "by_kind": cov["by_kind"],
            "untracked": untracked[:20],
        },
    }


def fit_workdir(
    model: str | Path,
    data: str | Path,
    workdir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    task: str = "causal-lm",
    modules: str | list[str] | None = "mlp",
    strategy: str = "ekfac",
    fisher: str = "auto",
    samples: int = 1,
    top: int = 8,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    overwrite: bool = False,
    keep_covariance: bool = False,
    allow_large: bool = False,
    max_factor_side: int = MAX_FACTOR_SIDE,
    fit_examples: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict:
    """Fit curvature for a local HF model on a data file into ``workdir``; returns cli.json's content.

    Inputs are validated (data read, model loaded, settings compared) before anything is
    written, so a bad argument leaves an existing workdir untouched. ``overwrite`` removes what
    headwater wrote there (factors, cached scores, results, index) and refits. Long because it
    is the fit command's steps in order, on one page: load, validate, fit or reuse, record.
    """
    import headwater as hw

    from ..data import fingerprint, sample_examples
    from ..io import file_sha256, tokenizer_sha256

    workdir = Path(workdir)
    model_path = Path(model).resolve()
    tok_path = Path(tokenizer).resolve() if tokenizer is not None else model_path
    data_path = Path(data).resolve()
    docs, net, tok, max_length = _load(model_path, tok_path, data_path, task, device, dtype, max_length)
    mods = parse_modules(modules)
    fisher = check_choice(fisher, "--fisher", FISHERS)
    fp = fingerprint(docs)
    tok_hash = tokenizer_sha256(tok_path)
    model_dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    kind, task = task, make_task(task, tok, max_length)

    def attributor(into: Path | None) -> Any:
        return hw.Attributor(
            net,
            task=task,
            strategy=strategy,
            modules=mods,
            fisher=fisher,
            samples=samples,
            top=top,
            workdir=into,
            seed=seed,
            progress=progress,
        )

    # Settings are validated before --overwrite removes anything: a typo must not cost the old fit.
    attributor(None)
    prev = None
    if overwrite:
        _reset(workdir)
    else:
        prev = _previous(workdir)
        _check_previous(prev, workdir, max_length, tok_hash, fp, dtype, model_dtype, kind, fit_examples)
    try:
        an = attributor(workdir)
    except WorkdirMismatchError as e:
        raise cli_mismatch(e, workdir) from e
    # --fit-examples N: the factors from a seeded sample (the engine's sample_examples, so the
    # Python API with max_examples=N fits the same sequences)
    fit_docs = sample_examples(docs, fit_examples, seed)
    reuse = an.curvature is not None and an.fit_fingerprint == fingerprint(fit_docs) and strategy != "identity"
    t0 = time.perf_counter()
    if reuse:
        log(f"reusing the factors fitted at {an.fitted_at} in {workdir} (pass --overwrite to refit)")
    else:
        log(
            f"fitting {strategy} on {len(docs)} documents from {data_path.name}, {len(an.layers)} layers, "
            f"max_length={max_length}"
        )
        _check_sizes(an, allow_large, max_factor_side, log)
        try:
            with located_warnings({"training data": (docs, data_path)}):
                an.fit(fit_docs, batch_size=batch_size, keep_covariance=keep_covariance)
        except ExampleError as e:
            raise at_location(e, docs, data_path) from e
    seconds = time.perf_counter() - t0
    settings = {
        "schema": CLI_SCHEMA,
        "headwater": hw.__version__,
        "created": now(),
        "model": str(model_path),
        "tokenizer": str(tok_path),
        "tokenizer_sha256": tok_hash,
        "task": kind,
        "data": str(data_path),
        "data_sha256": file_sha256(data_path),
        "data_fingerprint": fp,
        "fit_examples": fit_examples,
        "n_train": len(docs),
        "max_length": max_length,
        "modules": modules if isinstance(modules, (str, type(None))) else list(modules),
        "layers": list(an.layers),
        "strategy": strategy,
        "fisher": an.fisher,
        "samples": samples,
        "top": top,
        "batch_size": batch_size,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "model_dtype": model_dtype,
        "fit_seconds": round(seconds, 2),
        **_tracked(net, an.layers),
    }
    if reuse and prev is not None:
        # Nothing was fitted: cli.json keeps saying how the factors were made (batch size,
        # device, when), not what this no-op command was given.
        settings.update({k: prev[k] for k in FIT_RUNTIME if k in prev})
    save_json(workdir / CLI_FILE, settings)
    if not reuse and strategy != "identity":
        log(f"fitted in {seconds:.1f}s -> {workdir / FACTORS_FILE}")
    return settings
