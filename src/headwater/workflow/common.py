"""What every workflow shares: the CLI's settings file, reopening a fitted workdir, and messages in CLI terms.

A workdir holds the engine's files (``headwater.workdir``) plus ``cli.json``: the model,
tokenizer and data paths and ``max_length`` that ``fit`` used, so that ``score``, ``index`` and
``report`` reload the same things. A workdir fitted from Python has no ``cli.json``; the
commands then take the model from the path the engine recorded (a HF model loaded from a local
directory) or from ``--model``, and the data from ``--data``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ExampleError, HeadwaterWarning, TruncationWarning
from ..io import InputError, query_example, where
from ..storage import clean_leftovers, load_json, tensors_meta
from ..workdir import CALIBRATION_FILE, CONFIG_FILE, FACTORS_FILE, WorkdirMismatchError

__all__ = [
    "Log",
    "CLI_FILE",
    "RUNS",
    "RUN_FILE",
    "RESULTS_FILE",
    "SCORES_FILE",
    "REPORT_FILE",
    "ANALYSIS_FILE",
    "quiet_log",
    "now",
    "parse_modules",
    "read_settings",
    "Reopened",
    "reopen",
    "cli_mismatch",
    "at_location",
    "check_queries_fit",
    "make_task",
    "make_response",
    "check_damping",
    "check_fit_data",
    "located_warnings",
    "tidy",
    "calibration_summary",
    "recorded_data",
    "FLAGS",
]

Log = Callable[[str], None]
CLI_FILE = "cli.json"
RUNS = "results"  # WORKDIR/results/<run>/: one directory per scoring run
# The files of a run directory (see ``workflow.score``).
RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
SCORES_FILE = "scores.safetensors"
REPORT_FILE = "report.html"
ANALYSIS_FILE = "analysis.json"  # written by `headwater analyze`
CLI_SCHEMA = 2
# Engine settings -> the command-line option that sets them (for messages).
FLAGS = {
    "strategy": "--strategy",
    "fisher": "--fisher",
    "samples": "--samples",
    "top": "--top",
    "seed": "--seed",
    "modules": "--modules",
    "model": "--model",
    "task": "--tokenizer/--max-length",
}


def quiet_log(msg: str) -> None:
    return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_modules(modules: str | list[str] | None) -> str | list[str] | None:
    """'mlp'/'base'/'adapters' as they are, 'all' -> None (every supported layer), 'a,b' -> ['a', 'b']."""
    if modules is None or isinstance(modules, list):
        return modules
    if modules == "all":
        return None
    if modules in ("mlp", "base", "adapters"):
        return modules
    names = [m.strip() for m in modules.split(",") if m.strip()]
    if not names:
        raise InputError(f"--modules {modules!r} names no layer; pass 'mlp', 'all' or comma-separated names")
    return names


def read_settings(workdir: Path) -> dict:
    """cli.json of a workdir, or what a workdir fitted from Python records (config.json)."""
    if not workdir.exists():
        raise InputError(f"workdir {workdir} does not exist; run `headwater fit ... --workdir {workdir}` first")
    path = workdir / CLI_FILE
    if path.exists():
        settings = load_json(path, hint=f"refit with `headwater fit --overwrite --workdir {workdir} ...`")
        if not isinstance(settings, dict) or "model" not in settings:
            raise InputError(f"{path} is damaged (no 'model' entry); refit into a new workdir")
        return settings
    if not (workdir / CONFIG_FILE).exists():
        raise InputError(
            f"{workdir} is not a fitted headwater workdir (no {CLI_FILE}), nor one fitted from Python (no "
            f"{CONFIG_FILE}); run "
            f"`headwater fit --model PATH --data FILE --workdir {workdir}` first"
        )
    config = load_json(workdir / CONFIG_FILE, hint=f"delete {workdir} and refit")
    return {  # an API workdir: what the engine knows
        "model": config.get("model_path"),
        "tokenizer": config.get("model_path"),
        "data": None,
        "modules": config.get("layers") or list(config.get("modules") or {}),
        "strategy": config.get("strategy"),
        "fisher": config.get("fisher"),
        "samples": config.get("samples", 1),
        "top": config.get("top") or 8,
        "seed": config.get("seed", 0),
        "max_length": None,
        "from_python": True,
    }


@dataclass
class Reopened:
    """A fitted workdir, reloaded: the Attributor, its settings, the tokenizer and the task."""

    attributor: Any
    settings: dict
    tokenizer: Any
    task: Any


def reopen(
    workdir: Path,
    *,
    device: str | None = None,
    model: str | Path | None = None,
    tokenizer: str | Path | None = None,
    progress: bool = True,
) -> Reopened:
    """The Attributor a workdir describes, with the model, tokenizer and task it was fitted with."""
    import headwater as hw

    from ..io import load_model, load_tokenizer

    settings = read_settings(workdir)
    model_path = model or settings.get("model")
    if model_path is None:
        raise InputError(
            f"{workdir} was fitted from Python with a model headwater cannot reload by itself; pass --model DIR "
            "(the model's save_pretrained directory)"
        )
    kind = settings.get("task", "causal-lm")
    net = load_model(
        model_path, device=device or settings.get("device", "auto"), dtype=settings.get("dtype", "float32"), task=kind
    )
    tok = load_tokenizer(tokenizer or settings.get("tokenizer") or model_path)
    task = make_task(kind, tok, settings.get("max_length"))
    modules = settings.get("modules", "mlp")
    modules = parse_modules(modules) if isinstance(modules, str) else modules
    try:
        an = hw.Attributor(
            net,
            task=task,
            strategy=settings.get("strategy", "ekfac"),
            modules=modules,
            fisher=settings.get("fisher", "auto"),
            samples=settings.get("samples", 1),
            top=settings.get("top", 8),
            workdir=workdir,
            seed=settings.get("seed", 0),
            progress=progress,
        )
    except WorkdirMismatchError as e:
        raise cli_mismatch(e, workdir) from e
    return Reopened(an, settings, tok, task)


def make_task(kind: str, tokenizer: Any, max_length: int | None) -> Any:
    """The Task for a ``--task`` kind (``io.TASK_KINDS``)."""
    import headwater as hw

    if kind == "seq-cls":
        return hw.SequenceClassificationTask(tokenizer=tokenizer, max_length=max_length)
    if kind == "seq2seq":
        return hw.Seq2SeqTask(tokenizer=tokenizer, max_length=max_length)
    return hw.LanguageModelingTask(tokenizer=tokenizer, max_length=max_length)


def cli_mismatch(e: WorkdirMismatchError, workdir: Path) -> InputError:
    """The engine's 'workdir was made for other settings' in the command line's terms."""
    flag = FLAGS.get(e.key, e.key)
    if e.key == "model":
        what = "was made for another model (its weights or architecture differ from this one's)"
    elif e.key == "task":
        what = f"was made for another tokenizer or max length ({flag})"
    elif e.key == "modules":
        what = f"was made for another module set ({len(e.saved or {})} layers; {flag})"
    else:
        what = f"was made for {flag} {e.saved} (this command has {flag} {e.wanted})"
    return InputError(
        f"workdir {workdir} {what}; pass --overwrite to refit it with these settings, or use a new --workdir"
    )


def at_location(e: ExampleError, data: Any, path: str | Path) -> InputError:
    """An engine error about example ``e.index`` as one line naming its file and line."""
    return InputError(f"{where(data, path, e.index)} (example {e.index}){e.detail}")


def check_queries_fit(task: Any, queries: list[dict], path: Path, log: Log, kind: str = "causal-lm") -> None:
    """Tokenize every query once before scoring: say which prompts are cut, refuse what cannot fit.

    A prompt too long for ``max_length`` is truncated from the left (the completion is what is
    measured) with a warning naming the query's line, shown even with --quiet; a completion that
    cannot fit at all is an error naming it. Run the scoring under ``located_warnings`` with
    ``queries=None`` so the engine does not repeat these warnings without the line.
    """
    for i, q in enumerate(queries):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                task.collate([query_example(q, kind)])
            except ExampleError as e:
                raise InputError(f"{where(queries, path, i)}{e.detail}") from e
            except ValueError as e:
                raise InputError(f"{where(queries, path, i)}: {e}") from e
        for w in caught:
            if isinstance(w.message, TruncationWarning):
                warnings.warn(HeadwaterWarning(f"{where(queries, path, i)}{w.message.detail}"), stacklevel=2)


def check_fit_data(an: Any, docs: Any, path: Path, workdir: Path) -> None:
    """The data file recorded at fit time must still hold the data the factors were fitted on.

    Scoring it after an edit would silently mix factors of the old data with the new one; an
    explicit ``--data`` (any file, this one included) is the user's choice and is not checked.
    """
    from ..data import fingerprint

    expected = (read_settings(workdir).get("data_fingerprint") if (workdir / CLI_FILE).exists() else None) or (
        an.fit_fingerprint
    )
    fp = fingerprint(docs)
    if expected is not None and fp != expected:
        raise InputError(
            f"the training data {path} changed since the fit (fingerprint {expected}, now {fp}), so the "
            f"factors no longer describe it; refit with `headwater fit --overwrite --workdir {workdir} ...`, or pass "
            f"--data {path} to use it with the existing factors anyway"
        )


def check_damping(damping: float | str | None) -> float | str | None:
    """``--damping`` refused in the command line's terms before anything is read or written.

    A number (NaN and inf pass a plain ``>= 0`` option check, and inf turns every score into 0,
    so the option is a string checked here), or "calibrate": the damping that
    ``headwater.training.calibrate_damping`` saved in the workdir.
    """
    if damping is None or damping == "calibrate":
        return damping
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InputError(
            f"--damping {damping} is not a finite non-negative number or 'calibrate'; pass e.g. --damping 1e-3, or "
            "omit --damping for the paper's rule (0.1 x the mean eigenvalue of each layer)"
        )
    return value


def make_response(response: str | None, lr: float | None, steps: float | None, weight_decay: float = 0.0) -> Any:
    """``--response``: None (the influence function) or "unrolled" with ``--lr`` and ``--steps``."""
    if response in (None, "influence"):
        return None
    if response != "unrolled":
        raise InputError(f"--response {response!r} is unknown; choose influence or unrolled")
    if lr is None or steps is None:
        raise InputError("--response unrolled needs --lr and --steps (the training run's learning rate and step count)")
    from ..training import Unrolled

    return Unrolled(lr=lr, steps=steps, weight_decay=weight_decay)


@contextlib.contextmanager
def located_warnings(sources: dict[str, tuple[Any, Path] | None]) -> Iterator[None]:
    """Show the engine's truncation warnings with the file and line of the example they are about.

    The engine says "training data: example 7: ..."; ``sources`` maps the dataset's name
    ("training data", "queries"; "" for a bare ``task.collate``) to ``(records, path)`` for
    ``where``, or to None to drop them
    (already said, e.g. by ``check_queries_fit``). Each is shown once, not once per pass over the
    data (a fit makes two). Other warnings pass through unchanged.
    """
    seen: set[str] = set()
    with warnings.catch_warnings():
        outer = warnings.showwarning

        def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if isinstance(message, TruncationWarning):
                name = message.context.removesuffix(": ")  # "" for a direct task.collate
                if name in sources:
                    src = sources[name]
                    if src is None:
                        return
                    message = f"{where(src[0], src[1], message.index)}{message.detail}"
                    if message in seen:
                        return
                    seen.add(message)
            outer(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def tidy(*dirs: Path) -> None:
    """Remove dead writers' temporary files (a SIGKILL between write and rename) under ``dirs``.

    Every command does this for the directories it reads or writes, read-only ones included:
    such a file is garbage by construction (its writer is gone), and removing it is best-effort.
    """
    for d in dirs:
        with contextlib.suppress(OSError):
            clean_leftovers(d)


def calibration_summary(workdir: Path) -> dict | None:
    """The damping calibration saved in ``workdir`` (``headwater calibrate``), or None.

    ``current`` says whether it was made for the factors now in the workdir (a refit leaves it
    stale; ``damping="calibrate"`` then refuses it).
    """
    path = workdir / CALIBRATION_FILE
    if not path.exists():
        return None
    saved = load_json(path, hint="delete it and rerun `headwater calibrate`")
    cal = saved.get("calibration") or {}
    factors = workdir / FACTORS_FILE
    current = factors.exists() and saved.get("factors") == tensors_meta(factors, hint="refit with --overwrite")[1]
    keys = ("scale", "curve", "implied_weight_decay", "cost_fits", "seconds")
    return {**{k: cal.get(k) for k in keys}, "current": bool(current)}


def recorded_data(settings: dict, data: str | Path | None, workdir: Path) -> Path:
    """The training data file: ``--data``, else the one cli.json recorded at fit time (which must exist)."""
    if data is None:
        data = settings.get("data")
        if data is None:
            raise InputError(f"{workdir} was fitted from Python and records no data file; pass --data FILE")
        if not Path(data).exists():
            raise InputError(f"the training data {data} recorded at fit time no longer exists; pass --data FILE")
    return Path(data).resolve()
