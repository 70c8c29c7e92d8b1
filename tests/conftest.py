"""Shared fixtures. The reduced demo runs once per session: test_demo checks its results and
test_report renders its report in a browser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is faster than two, and on a shared 2-core
    machine spinning OpenMP threads (and functorch's batched products) slow down up to 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """``headwater demo --small --quiet --out DIR`` in-process: (DIR, click Result)."""
    from typer.testing import CliRunner

    from headwater.cli import app

    out = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(app, ["demo", "--small", "--quiet", "--out", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return out, result
