"""Crash safety: interrupted fits and scoring runs resume to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2
from headwater.storage import load_tensors

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import headwater as hw
    from headwater.storage import save_tensors
    from _models import lm_data, lm_queries, tiny_gpt2

    class Slow(hw.LanguageModelingTask):
        def loss(self, model, batch, sample=False):
            if os.environ.get("SLOW"):
                time.sleep(0.15)
            return super().loss(model, batch, sample)

    torch.set_num_threads(1)
    model = tiny_gpt2()
    train, queries = lm_data(40), lm_queries(3)
    an = hw.Attributor(model, task=Slow(), modules="mlp", workdir=sys.argv[1], checkpoint_every=1)
    an.fit(train, batch_size=2)
    res = an.scores(queries, train, batch_size=2, per_layer=True)
    save_tensors(sys.argv[2], res.tensors())
    """
)


def _run(args, env_extra=None, wait=True):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(tests=str(Path(__file__).parent)), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    return proc


def test_sigkilled_scoring_run_resumes_to_the_uninterrupted_result(tmp_path):
    _run([tmp_path / "clean", tmp_path / "clean.safetensors"])
    expected, _ = load_tensors(tmp_path / "clean.safetensors")

    work = tmp_path / "killed"
    proc = _run([work, tmp_path / "killed.safetensors"], {"SLOW": "1"}, wait=False)
    deadline = time.time() + 240
    blocks = []
    while time.time() < deadline and proc.poll() is None:
        blocks = list((work / "scores").glob("*/*.safetensors")) if (work / "scores").exists() else []
        if len(blocks) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(blocks) >= 3
    assert not list(work.glob("scores/*.safetensors")), "no final scores file after a kill"
    assert not list(work.rglob("*.part")) or all(p.stat().st_size >= 0 for p in work.rglob("*.part"))

    _run([work, tmp_path / "killed.safetensors"])
    got, _ = load_tensors(tmp_path / "killed.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert not (work / "scores" / blocks[0].parent.name).exists(), "blocks are removed once assembled"


def test_interrupted_fit_resumes_from_partial_sums_to_the_same_factors(tmp_path, monkeypatch):
    model = tiny_gpt2()
    train = lm_data(12)
    full = hw.Attributor(model, modules="mlp", fisher="sampled").fit(train, batch_size=2)  # Crash overrides loss

    class Crash(hw.LanguageModelingTask):
        calls = 0

        def loss(self, model, batch, sample=False):
            Crash.calls += 1
            if Crash.calls == 10:  # 6 batches per pass: dies inside the eigenvalue-correction pass
                raise KeyboardInterrupt
            return super().loss(model, batch, sample)

    an = hw.Attributor(model, task=Crash(), modules="mlp", workdir=tmp_path, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        an.fit(train, batch_size=2)
    assert (tmp_path / "covariance.safetensors").exists()
    assert list((tmp_path / "checkpoints").glob("eigenvalue_correction-*/rank0of1.safetensors"))

    resumed = hw.Attributor(model, task=Crash(), modules="mlp", workdir=tmp_path, checkpoint_every=1)
    seen = []
    original = hw.attributor.run_pass

    def spy(*args, **kwargs):  # records the batches the public loop actually runs
        consumer = args[4]
        finish = consumer.finish_batch
        consumer.finish_batch = lambda start: (seen.append(start // 2), finish(start))
        return original(*args, **kwargs)

    monkeypatch.setattr(hw.attributor, "run_pass", spy)
    resumed.fit(train, batch_size=2)
    assert seen == [3, 4, 5]  # batches 0-2 came from the partial sums
    for name in full.layers:
        torch.testing.assert_close(resumed.curvature[name].lam, full.curvature[name].lam)
    assert not list((tmp_path / "checkpoints").rglob("*.safetensors"))


def test_resuming_with_other_data_or_batch_size_says_which_differs(tmp_path):
    model = tiny_gpt2()
    train = lm_data(8)

    class Crash(hw.LanguageModelingTask):
        armed, n = True, 0

        def loss(self, model, batch, sample=False):
            Crash.n += 1
            if Crash.armed and Crash.n == 3:
                raise KeyboardInterrupt
            return super().loss(model, batch, sample)

    with pytest.raises(KeyboardInterrupt):
        hw.Attributor(model, task=Crash(), modules="mlp", workdir=tmp_path, checkpoint_every=1).fit(train, batch_size=2)
    Crash.armed = False
    with pytest.raises(ValueError, match="partial covariance pass with batch_size=2, but this fit has batch_size=4"):
        hw.Attributor(model, task=Crash(), modules="mlp", workdir=tmp_path).fit(train, batch_size=4)
    with pytest.raises(ValueError, match="partial covariance pass with fit_data="):
        hw.Attributor(model, task=Crash(), modules="mlp", workdir=tmp_path).fit(lm_data(8, seed=5), batch_size=2)


def test_finished_scoring_runs_are_cached_in_the_workdir(tmp_path, monkeypatch):
    model = tiny_gpt2()
    train, queries = lm_data(6), lm_queries(2)
    an = hw.Attributor(model, modules="mlp", workdir=tmp_path).fit(train)
    first = an.scores(queries, train, per_token=True)
    assert len(list((tmp_path / "scores").glob("*.safetensors"))) == 1
    monkeypatch.setattr(hw.attributor, "run_pass", None)  # a cached run must not touch the data
    again = an.scores(queries, train, per_token=True)
    torch.testing.assert_close(again.values, first.values)
    torch.testing.assert_close(again.per_token, first.per_token)
