"""What every command shares: the error contract, the warning display, offline mode, option types.

Imports nothing heavy: ``headwater --help`` must not load torch. Command bodies import the
workflow when they run.

The contract: an error prints one line ``headwater: error: ...`` on stderr and exits with status
2 (``--debug`` shows the traceback); Ctrl-C exits 130 and leaves no half-written file. headwater's
own warnings always show, as ``headwater: warning: ...``; other libraries' warnings are hidden
unless ``--debug``. Hugging Face's offline mode is switched on while a command runs (and
restored after, since tests and notebooks run commands in-process): nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "STATE",
    "QuietOpt",
    "DebugOpt",
    "WorkdirOpt",
    "DeviceOpt",
    "BatchOpt",
    "setup",
    "run_command",
    "echo_top",
    "new_app",
]

STATE = {"quiet": False, "debug": False}
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", "-w", help="A workdir made by `headwater fit`.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, ... (default: as fitted).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Sequences per batch (default: as fitted).")]


def new_app(name: str | None, help: str) -> typer.Typer:
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


def setup(quiet: bool, debug: bool) -> tuple[bool, bool, Callable[[str], None]]:
    """Merge per-command flags with the global ones; status lines go to stderr."""
    quiet = quiet or STATE["quiet"]
    debug = debug or STATE["debug"]
    log = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    return quiet, debug, log


def _one_line(e: BaseException) -> str:
    from ..errors import NonFiniteError, NotFittedError

    text = " ".join(str(e).split()) or type(e).__name__
    known = (ValueError, TypeError, FileNotFoundError, PermissionError, ArithmeticError, NotFittedError, NonFiniteError)
    if isinstance(e, known):
        return text
    return f"{type(e).__name__}: {text} (rerun with --debug for the traceback)"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    before = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(dict.fromkeys(OFFLINE, "1"))
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _warnings(quiet: bool, debug: bool) -> Iterator[None]:
    """headwater's warnings as one line each on stderr; third-party warnings hidden (unless --debug)."""
    from ..errors import HeadwaterWarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, HeadwaterWarning):
            typer.echo(f"headwater: warning: {' '.join(str(message).split())}", err=True)
        elif debug:
            typer.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True)

    hf_logging = None
    with warnings.catch_warnings():
        warnings.simplefilter("default" if debug else "ignore")
        warnings.simplefilter("default", HeadwaterWarning)  # once per message and place
        warnings.showwarning = show
        if not debug:
            with contextlib.suppress(Exception):
                from transformers.utils import logging as hf_logging
        if hf_logging is None:
            yield
            return
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def run_command(quiet: bool, debug: bool, fn: Callable[[], Any]) -> Any:
    """Run a command body under the error contract (see the module docstring)."""
    try:
        with _offline(), _warnings(quiet, debug):
            return fn()
    except KeyboardInterrupt:
        typer.echo("headwater: interrupted; no partial files were written", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if debug:
            raise
        typer.echo(f"headwater: error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None


def echo_top(results: list[dict]) -> None:
    """One terminal line per query: its most positive training sequence."""
    for r in results:
        if not r["top"]:
            typer.echo(f"{r['prompt']!r} -> {r['completion']!r}: no scored sequence")
            continue
        best = r["top"][0]
        text = best["text"].replace("\n", " ")
        text = text if len(text) <= 80 else text[:77] + "..."
        typer.echo(f"{r['prompt']!r} -> {r['completion']!r}: top {best['score']:+.3g} #{best['index']} {text}")
