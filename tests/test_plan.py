"""headwater plan: its estimates against what a fit really uses, measured in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import headwater as hw
from _models import lm_data, tiny_gpt2
from headwater.plan import plan_run

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel
    import headwater as hw
    from headwater.plan import plan_run, process_memory
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8000, n_positions=256, n_embd=256, n_layer=4, n_head=4)).eval()
    g = torch.Generator().manual_seed(1)
    train = [{"input_ids": torch.randint(0, 8000, (256,), generator=g)} for _ in range(32)]
    an = hw.Attributor(model, modules="mlp", workdir=sys.argv[2])
    if sys.argv[1] == "plan":
        p = plan_run(an, train, batch_size=16)
        print(json.dumps({"peak": p.peak(), "disk": p.stages[0].disk}))
    else:
        an.fit(train, batch_size=16)
        print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    """
)


def _run(mode: str, workdir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(workdir)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc")
def test_the_plan_predicts_the_peak_memory_and_the_factors_file_of_a_fit(tmp_path: Path) -> None:
    planned = _run("plan", tmp_path / "plan")
    measured = _run("fit", tmp_path / "fit")
    assert abs(planned["peak"] - measured["peak"]) / measured["peak"] < 0.25, (planned, measured)
    size = (tmp_path / "fit" / "factors.safetensors").stat().st_size
    assert abs(planned["disk"] - size) / size < 0.01  # the header is all that the formula leaves out


def test_plan_stages_sizes_and_the_largest_batch_for_a_budget() -> None:
    an = hw.Attributor(tiny_gpt2(dtype=torch.float32), modules="mlp")
    plan = plan_run(an, lm_data(12), batch_size=4, queries=3, index_dim=4)
    names = [s.name for s in plan.stages]
    assert names == [
        "fit: passes over the data",
        "fit: eigendecompositions",
        "score: queries x training data",
        "index: records",
    ]
    factors = 8 * sum(i * i + o * o + o * i for o, i in an.shapes.values())
    assert plan.stages[0].disk == factors
    scores = 4 * 3 * 12 * (1 + len(an.shapes))  # values and per-layer scores, float32
    assert plan.stages[2].disk == scores
    budget = plan.peak(4)
    assert plan.max_batch_size(budget) >= 4 and plan.max_batch_size(plan.baseline) == 0
    assert "fit: eigendecompositions" in plan.table()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        plan_run(an, lm_data(2), batch_size=0)
