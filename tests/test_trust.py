"""Numbers you can trust (issue 12): no stale, corrupted or silently wrong result from the command line.

Every test drives the ``headwater`` command in-process on tiny GPT-2 directories written here
with ``save_pretrained``, and checks one promise:

- a result in a workdir is from the current run or absent, whatever setting changed since;
- every artifact is verified on read: damage is one line naming the file and what to do, exit 2;
- the edge cases that once returned wrong numbers with exit 0 (one query, fp16, inf damping,
  long prompts, fewer candidates than top-k, a zero-loss model, out-of-range indices) either
  work or are refused, naming the file, line or column;
- leftovers of killed writers are removed, and ``headwater verify`` says what is wrong where.

The fuzzed version of the integrity checks is ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from headwater.cli import app
from headwater.storage import load_tensors, tensors_meta
from headwater.synthetic import make_corpus, train_tokenizer

runner = CliRunner()
MAX_LENGTH = 32


# ---------------------------------------------------------------------------------------
# Helpers (copied from tests/test_cli.py's patterns, not imported: test modules stay independent)
# ---------------------------------------------------------------------------------------


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)


def assert_error(result: Result, message: str) -> str:
    """Exit status 2, one readable line on stderr that matches ``message``, no traceback; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [x for x in re.split(r"[\r\n]+", result.stderr.strip()) if x.strip()]
    errors = [x for x in lines if "error" in x]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert lines[-1].startswith("headwater: error: "), lines[-1]
    assert re.search(message, lines[-1]), lines[-1]
    return lines[-1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content: to show that a refused command wrote nothing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def run_dirs(wd: Path) -> list[Path]:
    return sorted(p for p in (wd / "results").iterdir()) if (wd / "results").is_dir() else []


def the_run(wd: Path) -> Path:
    runs = run_dirs(wd)
    assert len(runs) == 1, runs
    return runs[0]


def values(run: Path) -> torch.Tensor:
    return load_tensors(run / "scores.safetensors")[0]["values"]


def flip(path: Path, offset: int, bit: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= bit
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def header_offset(path: Path, needle: str, after: int = 0) -> int:
    """Byte offset in a safetensors file's JSON header of the first ``needle`` (plus ``after``)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    i = data[8 : 8 + n].index(needle.encode())
    return 8 + i + len(needle) + after


def digit_offset(path: Path) -> int:
    """A digit near the middle of a JSON file: flipping its low bit keeps the JSON valid, changes a value."""
    text = path.read_bytes()
    return next(i for i in range(len(text) // 2, len(text)) if chr(text[i]).isdigit())


def copy(src: Path, dst: Path) -> Path:
    """A copy of a workdir whose recorded paths still point at the shared model and data."""
    shutil.copytree(src, dst)
    return dst


def parse_strict(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


# ---------------------------------------------------------------------------------------
# Fixtures: two models (same tokenizer, other weights), a second tokenizer, data, queries
# ---------------------------------------------------------------------------------------


def _save_model(path: Path, tok: Any, seed: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=48,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    corpus = make_corpus(seed=3, small=True)
    tok = train_tokenizer(corpus.docs, vocab_size=300)
    _save_model(root / "model_a", tok, seed=0)
    _save_model(root / "model_b", tok, seed=1)
    other = train_tokenizer(make_corpus(seed=5, small=True).docs[::-1], vocab_size=260)
    assert len(other) <= len(tok)  # its ids fit model_a's embedding
    other.save_pretrained(root / "tok_b")
    docs = corpus.docs[:12]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in corpus.queries[:2]]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "one.jsonl").write_text(json.dumps(queries[0]) + "\n")
    return {
        "root": root,
        "model_a": root / "model_a",
        "model_b": root / "model_b",
        "tok_b": root / "tok_b",
        "train": root / "train.jsonl",
        "queries": root / "queries.jsonl",
        "one": root / "one.jsonl",
        "tok": tok,
    }


def fit_args(files: dict, wd: Path, *extra: object, model: Path | None = None, data: Path | None = None) -> list:
    return [
        "fit",
        "--model",
        model or files["model_a"],
        "--data",
        data or files["train"],
        "--workdir",
        wd,
        "--max-length",
        MAX_LENGTH,
        "--quiet",
        *extra,
    ]


def score_args(files: dict, wd: Path, *extra: object) -> list:
    return ["score", "--workdir", wd, "--queries", files["queries"], "--top-k", 2, "--quiet", *extra]


@pytest.fixture(scope="module")
def base(files: dict[str, Path]) -> Path:
    """One workdir holding every kind of artifact: factors, covariance, a cached score block,
    a run (with analysis.json) and an index. Tests copy it before changing anything."""
    wd = files["root"] / "base"
    assert_ok(invoke(*fit_args(files, wd, "--keep-covariance")))
    assert_ok(invoke(*score_args(files, wd)))
    assert_ok(invoke("analyze", the_run(wd), "--quiet"))
    assert_ok(invoke("index", "build", "--workdir", wd, "--dim", 4, "--quiet"))
    return wd


def scores_cache(wd: Path) -> list[Path]:
    return sorted((wd / "scores").glob("*.safetensors")) if (wd / "scores").is_dir() else []


# ---------------------------------------------------------------------------------------
# 1. Stale results after a refit
# ---------------------------------------------------------------------------------------


def test_refit_with_other_max_length_recomputes_and_removes_old_results(
    files: dict, base: Path, tmp_path: Path
) -> None:
    """fit, score, fit --overwrite --max-length 12, score: the second run is new, never the first's."""
    wd = copy(base, tmp_path / "wd")
    first_run = the_run(wd)
    first, cache = values(first_run), scores_cache(wd)
    assert cache
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", "--max-length", 12)))
    assert not first_run.exists() and not any(p.exists() for p in cache)
    assert not (wd / "results").exists() and not (wd / "scores").exists() and not (wd / "index").exists()
    res = invoke(*score_args(files, wd))
    assert_ok(res)
    assert "reusing the cached scores" not in res.stderr
    run = the_run(wd)
    meta = json.loads((run / "run.json").read_text())
    assert meta["cached"] is False and meta["fit"]["max_length"] == 12
    assert meta["factors"] == tensors_meta(wd / "factors.safetensors")[1]
    assert not torch.allclose(values(run), first)


# ---------------------------------------------------------------------------------------
# 2. The whole CLI: outputs are from the current run or absent, whatever changed
# ---------------------------------------------------------------------------------------

# setting -> (fit options that change it, what cli.json and run.json["fit"] then record)
FIT_SETTINGS = {
    "max length": (["--max-length", 24], {"max_length": 24}),
    "tokenizer": (["--tokenizer", "tok_b"], {"tokenizer": "tok_b"}),
    "strategy": (["--strategy", "kfac"], {"strategy": "kfac"}),
    "fisher": (["--fisher", "sampled"], {"fisher": "sampled"}),
    "samples": (["--samples", 2], {"samples": 2}),
    "top": (["--top", 3], {"top": 3}),
    "modules": (["--modules", "all"], {"modules": None}),
    "seed": (["--seed", 1], {"seed": 1}),
    "dtype": (["--dtype", "bfloat16"], {"dtype": "bfloat16", "model_dtype": "bfloat16"}),
}


def _resolve(files: dict, options: list) -> list:
    return [files[o] if isinstance(o, str) and o in files else o for o in options]


def _check_current(wd: Path, before: torch.Tensor, expect: dict, files: dict, res: Result) -> None:
    """After a refit and a score: one run, from these factors and settings, recomputed, with other values."""
    assert_ok(res)
    assert "reusing the cached scores" not in res.stderr
    run = the_run(wd)
    meta = json.loads((run / "run.json").read_text())
    settings = json.loads((wd / "cli.json").read_text())
    factors = tensors_meta(wd / "factors.safetensors")[1]
    assert meta["cached"] is False and meta["factors"] == factors
    for key, value in expect.items():
        value = str(files[value].resolve()) if isinstance(value, str) and value in files else value
        if key == "modules":  # --modules all tracks every supported layer
            assert len(settings["layers"]) > 4 and meta["fit"]["layers"] == settings["layers"]
            continue
        assert settings[key] == value and meta["fit"][key] == value, key
    for cached in scores_cache(wd):  # no engine cache entry from other factors
        assert tensors_meta(cached)[0]["run"]["factors"] == factors
    assert not torch.equal(values(run), before)


@pytest.mark.parametrize("setting", list(FIT_SETTINGS))
def test_every_fit_setting_needs_overwrite_then_recomputes(
    files: dict, base: Path, tmp_path: Path, setting: str
) -> None:
    wd = copy(base, tmp_path / "wd")
    before = values(the_run(wd))
    options, expect = FIT_SETTINGS[setting]
    options = _resolve(files, options)
    state = snapshot(wd)
    res = invoke(*fit_args(files, wd, *options))
    assert_error(res, r"--overwrite")
    assert snapshot(wd) == state, "a refused fit changed the workdir"
    assert_ok(invoke(*fit_args(files, wd, *options, "--overwrite")))
    assert not (wd / "results").exists() and not (wd / "index").exists() and not scores_cache(wd)
    _check_current(wd, before, expect, files, invoke(*score_args(files, wd)))


def test_changed_model_weights_are_refused_then_refitted(files: dict, tmp_path: Path) -> None:
    """The same model directory with other weights: score and fit refuse; --overwrite refits."""
    model = tmp_path / "model"
    shutil.copytree(files["model_a"], model)
    wd = tmp_path / "wd"
    assert_ok(invoke(*fit_args(files, wd, model=model)))
    assert_ok(invoke(*score_args(files, wd)))
    before = values(the_run(wd))
    shutil.rmtree(model)
    shutil.copytree(files["model_b"], model)
    state = snapshot(wd)
    assert_error(invoke(*score_args(files, wd)), "was made for another model")
    assert_error(invoke(*fit_args(files, wd, model=model)), "was made for another model.*--overwrite")
    assert snapshot(wd) == state
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", model=model)))
    _check_current(wd, before, {}, files, invoke(*score_args(files, wd)))


def test_changed_data_content_is_refused_then_refitted(files: dict, tmp_path: Path) -> None:
    """The same data file with other content: score and fit refuse (the factors describe the old
    data); --data scores it against the existing factors on purpose; --overwrite refits."""
    data = tmp_path / "train.jsonl"
    shutil.copy(files["train"], data)
    wd = tmp_path / "wd"
    assert_ok(invoke(*fit_args(files, wd, data=data)))
    assert_ok(invoke(*score_args(files, wd)))
    before = values(the_run(wd))
    with data.open("a") as f:
        f.write(json.dumps({"text": "A thirteenth document, added after the fit."}) + "\n")
    state = snapshot(wd)
    assert_error(invoke(*score_args(files, wd)), r"train\.jsonl changed since the fit.*--overwrite.*--data")
    assert_error(invoke(*fit_args(files, wd, data=data)), r"fitted on other data.*--overwrite")
    assert snapshot(wd) == state
    assert_ok(invoke(*score_args(files, wd, "--data", data)))  # explicit: the user's choice
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", data=data)))
    _check_current(wd, before, {}, files, invoke(*score_args(files, wd)))
    assert values(the_run(wd)).shape[1] == 13


# score option -> the run.json entry that records it and the value it must hold
SCORE_SETTINGS = {
    "damping": (["--damping", 0.5], "damping_arg", 0.5),
    "query rank": (["--query-rank", 2], "query_rank", 2),
    "candidates": (["--candidates", 3], "candidates", 3),
    "top-k": (["--top-k", 3], "top_k", 3),
}


@pytest.mark.parametrize("setting", list(SCORE_SETTINGS))
def test_every_score_setting_gets_its_own_run(files: dict, base: Path, tmp_path: Path, setting: str) -> None:
    """Scoring options reuse the fit but never an earlier run: another directory, recorded, recomputed."""
    wd = copy(base, tmp_path / "wd")
    old = the_run(wd)
    old_files = snapshot(old)
    options, key, value = SCORE_SETTINGS[setting]
    res = invoke(*score_args(files, wd), *options)
    assert_ok(res)
    (new,) = [r for r in run_dirs(wd) if r != old]
    assert snapshot(old) == old_files  # the earlier run is left as it was, under its own name
    meta = json.loads((new / "run.json").read_text())
    assert meta[key] == value
    rows = [parse_strict(x) for x in (new / "results.jsonl").read_text().splitlines()]
    if setting == "top-k":  # the same scores (rightly from the cache), more of them listed
        assert meta["cached"] is True and torch.equal(values(new), values(old))
        assert all(len(r["top"]) == 3 for r in rows)
    else:
        assert meta["cached"] is False and "reusing the cached scores" not in res.stderr
        assert not torch.equal(values(new), values(old))


def test_rescoring_into_the_same_out_removes_its_old_analysis(files: dict, base: Path, tmp_path: Path) -> None:
    """`--out DIR` reused: analysis.json described the replaced scores, so it goes (verify agrees)."""
    wd = copy(base, tmp_path / "wd")
    out = tmp_path / "run"
    assert_ok(invoke(*score_args(files, wd, "--out", out)))
    assert_ok(invoke("analyze", out, "--quiet"))
    assert (out / "analysis.json").exists()
    assert_ok(invoke(*score_args(files, wd, "--out", out, "--damping", 0.5)))
    assert not (out / "analysis.json").exists()
    assert json.loads((out / "run.json").read_text())["damping_arg"] == 0.5


def test_report_of_an_older_run_shows_the_settings_it_was_scored_with(files: dict, base: Path, tmp_path: Path) -> None:
    """A run kept outside the workdir (--out) outlives a refit: its report must not take the new settings."""
    wd = copy(base, tmp_path / "wd")
    out = tmp_path / "kept"
    assert_ok(invoke(*score_args(files, wd, "--out", out)))
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", "--max-length", 24)))
    assert_ok(invoke("report", out, "--quiet"))
    html = (out / "report.html").read_text()
    assert f"<th>Max length</th><td>{MAX_LENGTH}</td>" in html and "<td>24</td>" not in html
    from headwater.storage import json_checksum, load_json

    assert load_json(out / "run.json")["report_checksum"] == json_checksum(html)  # rewritten with it


def test_reused_fit_keeps_recording_how_it_was_fitted(files: dict, base: Path, tmp_path: Path) -> None:
    """A no-op fit (same inputs, another --batch-size) must not claim the factors were fitted with it."""
    wd = copy(base, tmp_path / "wd")
    factors = (wd / "factors.safetensors").read_bytes()
    res = invoke(*fit_args(files, wd, "--batch-size", 3))
    assert_ok(res)
    assert (wd / "factors.safetensors").read_bytes() == factors
    assert (
        json.loads((wd / "cli.json").read_text())["batch_size"]
        == tensors_meta(wd / "factors.safetensors")[0]["batch_size"]
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--strategy", "bogus"], "strategy='bogus' is unknown"),
        (["--modules", "no.such.layer"], "module 'no.such.layer' does not exist"),
        (["--fisher", "exact"], "--fisher='exact' is unknown"),
    ],
)
def test_overwrite_with_a_bad_setting_keeps_the_old_fit(
    files: dict, base: Path, tmp_path: Path, options: list, message: str
) -> None:
    wd = copy(base, tmp_path / "wd")
    state = snapshot(wd)
    assert_error(invoke(*fit_args(files, wd, "--overwrite", *options)), message)
    assert snapshot(wd) == state


def test_an_index_outside_the_workdir_goes_stale_on_refit(files: dict, base: Path, tmp_path: Path) -> None:
    """The refit clears WORKDIR/index, not an --index elsewhere: build and query must not reuse it."""
    wd = copy(base, tmp_path / "wd")
    index = tmp_path / "index"
    assert_ok(invoke("index", "build", "--workdir", wd, "--index", index, "--dim", 4, "--quiet"))
    query = ["index", "query", "--workdir", wd, "--index", index, "--queries", files["queries"], "--quiet"]
    assert_ok(invoke(*query))
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", "--max-length", 12)))
    assert_error(invoke(*query), r"was built with another tokenizer or max length.*index build .*--overwrite")
    build = ["index", "build", "--workdir", wd, "--index", index, "--dim", 4, "--quiet"]
    assert_error(invoke(*build), r"was built with another tokenizer or max length; pass --overwrite")
    assert_ok(invoke(*build, "--overwrite"))
    assert_ok(invoke(*query))


# ---------------------------------------------------------------------------------------
# 3. Integrity: damage is found on read, named, and never used
# ---------------------------------------------------------------------------------------


def _run_file(name: str) -> Callable[[Path], Path]:
    return lambda wd: the_run(wd) / name


def _cached(wd: Path) -> Path:
    return scores_cache(wd)[0]


def _shard(wd: Path) -> Path:
    return next((wd / "index").glob("shard-*.bin"))


def _factors_only(wd: Path) -> None:
    """A fit killed after its covariance pass: the covariance sums are there, the factors not yet."""
    (wd / "factors.safetensors").unlink()


# name -> (file, damage, [commands that read it], what the message must say to do)
def _integrity_cases() -> list:
    sf = {
        "data": lambda p: flip(p, -9),
        "header offsets": lambda p: flip(p, header_offset(p, '"data_offsets":[', 1)),
        "header checksum": lambda p: flip(p, header_offset(p, "xxh3-128:", 0)),
        "truncated": truncate,
    }
    js = {"value": lambda p: flip(p, digit_offset(p)), "truncated": truncate}
    readers = {
        "factors": (lambda wd: wd / "factors.safetensors", sf, ["score", "inspect", "index query"], "--overwrite"),
        "covariance": (lambda wd: wd / "covariance.safetensors", sf, ["resume fit"], "delete it"),
        "cached scores": (_cached, sf, ["score"], "delete it to recompute"),
        "run scores": (_run_file("scores.safetensors"), sf, ["report", "analyze"], "rerun `headwater score`"),
        "results.jsonl": (_run_file("results.jsonl"), js, ["report", "analyze"], "rerun `headwater score`"),
        "run.json": (_run_file("run.json"), js, ["report", "analyze"], "rerun `headwater score`"),
        "config.json": (lambda wd: wd / "config.json", js, ["score", "fit", "inspect"], "delete|refit"),
        "cli.json": (lambda wd: wd / "cli.json", js, ["score", "inspect", "index query"], "--overwrite"),
        "manifest.json": (lambda wd: wd / "index" / "manifest.json", js, ["index query", "index build"], "--overwrite"),
        "shard": (_shard, {"byte": lambda p: flip(p, 5), "truncated": truncate}, ["index query"], "index build"),
        "projections": (lambda wd: wd / "index" / "projections.safetensors", sf, ["index query"], "--overwrite"),
    }
    cases = []
    for name, (where, damages, commands, todo) in readers.items():
        for how in damages:
            cases.append(pytest.param(name, where, damages[how], commands, todo, id=f"{name}-{how}"))
    return cases


def _command(files: dict, wd: Path, name: str) -> list:
    return {
        "score": score_args(files, wd),
        "inspect": ["inspect", wd],
        "fit": fit_args(files, wd),
        "resume fit": fit_args(files, wd, "--keep-covariance"),
        "report": ["report", wd, "--quiet"],
        "analyze": ["analyze", wd, "--quiet"],
        "index query": ["index", "query", "--workdir", wd, "--queries", files["queries"], "--quiet"],
        "index build": ["index", "build", "--workdir", wd, "--dim", 4, "--quiet"],
    }[name]


@pytest.mark.parametrize("name, where, damage, commands, todo", _integrity_cases())
def test_damaged_artifact_is_one_line_naming_it(
    files: dict,
    base: Path,
    tmp_path: Path,
    name: str,
    where: Callable[[Path], Path],
    damage: Callable[[Path], None],
    commands: list,
    todo: str,
) -> None:
    wd = copy(base, tmp_path / "wd")
    if name == "covariance":
        _factors_only(wd)
    target = where(wd)
    damage(target)
    for command in commands:
        before = snapshot(wd)
        line = assert_error(invoke(*_command(files, wd, command)), re.escape(target.name))
        assert re.search(todo, line), (command, line)
        assert str(target) in line or str(target.relative_to(wd)) in line, line
        assert snapshot(wd) == before, f"{command} wrote to the workdir although it failed"


# ---------------------------------------------------------------------------------------
# 4. One query
# ---------------------------------------------------------------------------------------


def test_one_query_scores_reports_and_analyzes(files: dict, base: Path, tmp_path: Path) -> None:
    wd = copy(base, tmp_path / "wd")
    old = set(run_dirs(wd))
    assert_ok(invoke("score", "--workdir", wd, "--queries", files["one"], "--top-k", 2, "--quiet"))
    assert_ok(invoke("index", "query", "--workdir", wd, "--queries", files["one"], "--quiet"))
    new = [r for r in run_dirs(wd) if r not in old]
    assert len(new) == 2
    for run in new:
        assert {p.name for p in run.iterdir()} >= {"scores.safetensors", "results.jsonl", "report.html", "run.json"}
        assert len((run / "results.jsonl").read_text().splitlines()) == 1 and values(run).shape[0] == 1
        assert_ok(invoke("report", run, "--quiet"))
        res = invoke("analyze", run)
        assert_ok(res)
        assert json.loads((run / "analysis.json").read_text())["n_queries"] == 1
        assert 'class="seq"' in (run / "report.html").read_text()


# ---------------------------------------------------------------------------------------
# 5. Half precision on CPU
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_logits(files: dict[str, Path]) -> tuple[Path, torch.Tensor]:
    """model_a with +4 added to every logit (softmax cannot tell), and its float32 scores.

    A batch's logits then sum to ~1e5, beyond float16's 65504: summed in float16, a finiteness
    check overflows and calls every batch non-finite (the original "--dtype float16 always fails").
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(files["model_a"])
    with torch.no_grad():  # h[0] = 2 at every position (ln_f), and every logit gets 2 * wte[v, 0] = +4 more
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 2.0
        model.transformer.wte.weight[:, 0] = 2.0
    path = files["root"] / "big_logits"
    model.save_pretrained(path)
    files["tok"].save_pretrained(path)
    wd = files["root"] / "big_logits_fp32"
    assert_ok(invoke(*fit_args(files, wd, model=path)))
    assert_ok(invoke(*score_args(files, wd)))
    return path, values(the_run(wd))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_fit_and_score(files: dict, big_logits: tuple, tmp_path: Path, dtype: str) -> None:
    """Half-precision fit and score work on CPU and agree with float32 (correlation > 0.95)."""
    model, ref = big_logits
    wd = tmp_path / "wd"
    assert_ok(invoke(*fit_args(files, wd, "--dtype", dtype, model=model)))
    assert_ok(invoke(*score_args(files, wd)))
    got = values(the_run(wd)).double()
    assert torch.isfinite(got).all()
    assert json.loads((the_run(wd) / "run.json").read_text())["fit"]["model_dtype"] == dtype
    corr = torch.corrcoef(torch.stack([got.flatten(), ref.double().flatten()]))[0, 1].item()
    assert corr > 0.95, corr


# ---------------------------------------------------------------------------------------
# 6. Damping that is not a finite non-negative number
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", ["inf", "nan", "-1", "-inf"])
def test_bad_damping_is_refused_before_anything_is_written(
    files: dict, base: Path, tmp_path: Path, damping: str
) -> None:
    wd = copy(base, tmp_path / "wd")
    state = snapshot(wd)
    assert_error(invoke(*score_args(files, wd, "--damping", damping)), r"--damping .* is not a finite non-negative")
    query = ["index", "query", "--workdir", wd, "--queries", files["queries"], "--damping", damping, "--quiet"]
    assert_error(invoke(*query), r"--damping .* is not a finite non-negative")
    assert snapshot(wd) == state


# ---------------------------------------------------------------------------------------
# 7. Prompts and completions longer than the context
# ---------------------------------------------------------------------------------------


def test_long_prompt_is_cut_from_the_left_and_a_long_completion_refused(files: dict, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    assert_ok(invoke(*fit_args(files, wd, "--max-length", 16)))
    completion = " Markadra"
    n_completion = len(files["tok"](completion)["input_ids"])
    q = tmp_path / "long.jsonl"
    q.write_text(
        json.dumps({"prompt": "Kamok Elrin", "completion": " printer"})
        + "\n"
        + json.dumps({"prompt": "Kamok Elrin was born in " * 6, "completion": completion})
        + "\n"
    )
    res = invoke("score", "--workdir", wd, "--queries", q, "--top-k", 2, "--quiet")
    assert_ok(res)
    warned = [x for x in res.stderr.splitlines() if "truncated" in x]
    assert len(warned) == 1, res.stderr  # once, with its line, not again by the engine without it
    assert re.match(
        rf"headwater: warning: .*long\.jsonl, line 2: the prompt was truncated from the left by \d+ of \d+ tokens "
        rf"so that the {n_completion} scored tokens fit max_length=16",
        warned[0],
    ), warned[0]
    state = snapshot(wd)
    with q.open("a") as f:
        f.write(json.dumps({"prompt": "a", "completion": " Markadra was born in" * 8}) + "\n")
    assert_error(invoke("score", "--workdir", wd, "--queries", q, "--quiet"), r"long\.jsonl, line 3: .*completion")
    assert snapshot(wd) == state


# ---------------------------------------------------------------------------------------
# 8. Fewer candidates than top-k
# ---------------------------------------------------------------------------------------


def test_fewer_candidates_than_top_k_lists_only_scored_sequences(files: dict, base: Path, tmp_path: Path) -> None:
    wd = copy(base, tmp_path / "wd")
    res = invoke("score", "--workdir", wd, "--queries", files["queries"], "--candidates", 3, "--top-k", 10, "--quiet")
    assert_ok(res)
    (run,) = [r for r in run_dirs(wd) if r.name != the_run(base).name]
    assert json.loads((run / "run.json").read_text())["top_k"] == 3  # min(top-k, candidates)
    mask = load_tensors(run / "scores.safetensors")[0]["mask"]
    rows = [parse_strict(x) for x in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["top"]) == len(row["bottom"]) == 3
        assert all(mask[row["query"], e["index"]] for e in row["top"] + row["bottom"])
        assert all(abs(e["score"]) < float("inf") for e in row["top"] + row["bottom"])
        assert row["stats"]["n"] == 3
    for f in run.iterdir():
        if f.suffix in (".json", ".jsonl", ".html"):
            text = f.read_text()
            assert "Infinity" not in text and "NaN" not in text, f
    parse_strict((run / "run.json").read_text())
    assert_ok(invoke("report", run, "--quiet"))


# ---------------------------------------------------------------------------------------
# 9. A model that is certain of its data: zero curvature
# ---------------------------------------------------------------------------------------


def test_zero_loss_model_warns_at_fit_and_scores_with_positive_damping(files: dict, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(files["model_a"])
    t = files["tok"](" a")["input_ids"][0]
    with torch.no_grad():  # every position predicts token t with logit margin 1e4: p(t) == 1 exactly
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 100.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[t, 0] = 100.0
    path = tmp_path / "certain"
    model.save_pretrained(path)
    files["tok"].save_pretrained(path)
    data = tmp_path / "zero.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [t] * (4 + i)}) + "\n" for i in range(6)))
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"prompt": " a a", "completion": " a a"}) + "\n")
    wd = tmp_path / "wd"
    res = invoke("fit", "--model", path, "--data", data, "--workdir", wd, "--quiet")
    assert_ok(res)
    warning = [x for x in res.stderr.splitlines() if x.startswith("headwater: warning: ")]
    assert len(warning) == 1 and "zero curvature" in warning[0], res.stderr
    res = invoke("score", "--workdir", wd, "--queries", q, "--top-k", 2, "--quiet")
    assert_ok(res)
    damping = json.loads((the_run(wd) / "run.json").read_text())["damping"]
    assert damping and all(0 < d < float("inf") for d in damping.values())
    assert torch.isfinite(values(the_run(wd))).all()


# ---------------------------------------------------------------------------------------
# 10. Messages that name the file, line or column
# ---------------------------------------------------------------------------------------


def test_out_of_range_relevant_is_refused_naming_the_line(files: dict, base: Path, tmp_path: Path) -> None:
    wd = copy(base, tmp_path / "wd")
    q = tmp_path / "rel.jsonl"
    q.write_text(
        json.dumps({"prompt": "a", "completion": " b", "relevant": [0]})
        + "\n"
        + json.dumps({"prompt": "a", "completion": " b", "relevant": [1, 12]})
        + "\n"
    )
    state = snapshot(wd)
    message = r"rel\.jsonl, line 2: 'relevant' index 12 is out of range for the 12 documents"
    assert_error(invoke("score", "--workdir", wd, "--queries", q, "--quiet"), message)
    assert_error(invoke("index", "query", "--workdir", wd, "--queries", q, "--quiet"), message)
    q.write_text(json.dumps({"prompt": "a", "completion": " b", "relevant": [-1]}) + "\n")
    assert_error(invoke("score", "--workdir", wd, "--queries", q, "--quiet"), r"line 1: 'relevant' index -1")
    assert snapshot(wd) == state


def test_training_completion_longer_than_max_length_names_file_and_line(files: dict, tmp_path: Path) -> None:
    data = tmp_path / "pc.jsonl"
    data.write_text(
        json.dumps({"prompt": "a", "completion": " b"})
        + "\n\n"
        + json.dumps({"prompt": "a", "completion": " b c d e f g h i j k l m n o p" * 4})
        + "\n"
    )
    res = invoke("fit", "--model", files["model_a"], "--data", data, "--workdir", tmp_path / "wd", "--max-length", 16)
    assert_error(res, r"pc\.jsonl, line 3 .*completion.*max_length=16")
    assert not (tmp_path / "wd" / "factors.safetensors").exists()


def test_long_training_prompt_warning_names_file_and_line(files: dict, tmp_path: Path) -> None:
    """The engine says "training data: example 1"; the command says which file and line, once."""
    data = tmp_path / "pc.jsonl"
    data.write_text(
        json.dumps({"prompt": "a", "completion": " b"})
        + "\n\n"
        + json.dumps({"prompt": "Kamok Elrin was born in " * 6, "completion": " Markadra"})
        + "\n"
    )
    wd = tmp_path / "wd"
    for args in (fit_args(files, wd, "--max-length", 16, data=data), score_args(files, wd)):
        res = invoke(*args)
        assert_ok(res)
        warned = [x for x in res.stderr.splitlines() if "truncated" in x]
        assert all(re.match(r"headwater: warning: .*\.jsonl, line \d+: the prompt was", x) for x in warned), warned
        ours = [x for x in warned if "pc.jsonl" in x]
        assert len(ours) == 1 and re.search(r"pc\.jsonl, line 3: the prompt was truncated from the left", ours[0])


def test_parquet_text_column_of_integers_names_the_column(files: dict, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    res = invoke("fit", "--model", files["model_a"], "--data", tmp_path / "ints.parquet", "--workdir", tmp_path / "w")
    assert_error(res, r"ints\.parquet: column 'text' holds int64, not strings")


def test_parquet_text_that_is_not_utf8_names_the_column(files: dict, tmp_path: Path) -> None:
    """Parquet readers do not check string bytes; a damaged file must not fail mid-fit, naming nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    table = pa.table({"text": ["The river froze.", "MARKER-damaged-here"]})
    pq.write_table(table, path, compression="NONE", write_statistics=False)
    data = path.read_bytes()
    assert data.count(b"MARKER") == 1  # uncompressed, stored once: replace it by bytes that are not UTF-8
    path.write_bytes(data.replace(b"MARKER", b"\xff\xfe\xfdKER"))
    res = invoke("fit", "--model", files["model_a"], "--data", path, "--workdir", tmp_path / "w", "--quiet")
    assert_error(res, r"bad\.parquet: column 'text' holds invalid values .*not UTF-8")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("keep", [0.5, 0.001, 0.0])
def test_truncated_scores_file_is_named_by_inspect_and_report(
    files: dict, base: Path, tmp_path: Path, keep: float
) -> None:
    wd = copy(base, tmp_path / "wd")
    out = wd  # a run written into the workdir itself (`score --out WORKDIR`), and one under results/
    assert_ok(invoke(*score_args(files, wd, "--out", out)))
    for run in (out, the_run(wd)):
        truncate(run / "scores.safetensors", keep)
        target = re.escape(str(run / "scores.safetensors"))
        assert_error(invoke("report", run, "--quiet"), target + r".*rerun `headwater score`")
        assert_error(invoke("analyze", run, "--quiet"), target)
        res = invoke("inspect", wd)
        assert_ok(res)
        assert re.search(rf"run +{re.escape(str(run))} +\(damaged: {target} .*rerun `headwater score`", res.stdout)
        info = json.loads(invoke("inspect", wd, "--json").stdout)
        assert any(str(run / "scores.safetensors") in r.get("damaged", "") for r in info["runs"])


# ---------------------------------------------------------------------------------------
# 11. Leftovers of killed writers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary file of a writer SIGKILLed between write and rename, made by the real writer.

    A subprocess writes with ``atomic_write_bytes`` and dies (``os._exit``, like SIGKILL: no
    cleanup runs) where it would rename; its PID, recorded in the file name, is then dead.
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("killed")
    code = (
        "import os; from headwater import storage; os.replace = lambda *a: os._exit(9); "
        f"storage.atomic_write_bytes({str(root / 'scores.safetensors')!r}, b'half a file')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    (temp,) = root.glob(".scores.safetensors.*.part")
    return temp


def _place(temp: Path, directory: Path, pid: int | None = None, host: str | None = None) -> Path:
    """A copy of ``temp`` in ``directory``, under its writer's name or another writer's ``host``/``pid``."""
    stem, writer, rand, part = temp.name.rsplit(".", 3)  # ".NAME", "HOST-PID", "RANDOM", "part"
    old_host, _, old_pid = writer.rpartition("-")
    name = f"{stem}.{host or old_host}-{old_pid if pid is None else pid}.{rand}.{part}"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(temp, directory / name)
    return directory / name


@pytest.mark.parametrize(
    "command", ["fit", "score", "report", "analyze", "inspect", "verify", "index build", "index query"]
)
def test_dead_writers_temp_files_are_removed_by_the_next_command(
    files: dict, base: Path, tmp_path: Path, killed_writer: Path, command: str
) -> None:
    wd = copy(base, tmp_path / "wd")
    run = the_run(wd)
    dirs = [wd, wd / "scores", run, wd / "index"]
    if command in ("report", "analyze"):
        dirs = [run]  # they touch the run directory only
    leftovers = [_place(killed_writer, d) for d in dirs]
    live = [_place(killed_writer, d, pid=os.getpid()) for d in dirs]  # a writer still at work
    foreign = [_place(killed_writer, d, host="otherhost") for d in dirs]  # a shared file system
    args = {
        "fit": fit_args(files, wd),
        "score": score_args(files, wd),
        "report": ["report", run, "--quiet"],
        "analyze": ["analyze", run, "--quiet"],
        "inspect": ["inspect", wd],
        "verify": ["verify", wd],
        "index build": ["index", "build", "--workdir", wd, "--dim", 4, "--quiet"],
        "index query": ["index", "query", "--workdir", wd, "--queries", files["queries"], "--quiet"],
    }[command]
    res = invoke(*args)
    assert_ok(res)
    assert not [p for p in leftovers if p.exists()], "a dead writer's temporary file was left"
    assert all(p.exists() for p in live + foreign), "a live (or another host's) writer's file was removed"


def test_fit_leaves_no_empty_progress_directories(files: dict, tmp_path: Path) -> None:
    for strategy in ("ekfac", "diagonal"):
        wd = tmp_path / strategy
        assert_ok(invoke(*fit_args(files, wd, "--strategy", strategy)))
        assert_ok(invoke(*score_args(files, wd)))
        assert not (wd / "checkpoints").exists() and not (wd / "partial").exists()
        assert not [p for p in (wd / "scores").iterdir() if p.is_dir()]  # finished score runs keep no progress
        assert not [p for p in wd.rglob("*") if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------
# 12. headwater verify
# ---------------------------------------------------------------------------------------

LINE = re.compile(r"^(OK|CORRUPT|STALE|MISSING) +(\S+?)(?:: (.*))?$")


def verify(wd: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit status and {path relative to wd: (status, detail)} of everything verify flagged."""
    res = invoke("verify", wd)
    assert res.exit_code in (0, 1), (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = res.stdout.strip().splitlines()
    assert re.match(r"\d+ ok, \d+ with problems", lines[-1]), lines[-1]
    bad = {}
    for line in lines[:-1]:
        m = LINE.match(line)
        assert m, line
        if m.group(1) != "OK":
            path = Path(m.group(2))
            bad[str(path.relative_to(wd)) if path.is_relative_to(wd) else str(path)] = (m.group(1), m.group(3) or "")
    return res.exit_code, bad


def test_verify_passes_a_fresh_workdir(base: Path, tmp_path: Path) -> None:
    wd = copy(base, tmp_path / "wd")
    code, bad = verify(wd)
    assert code == 0 and bad == {}
    out = invoke("verify", wd).stdout
    for artifact in (
        "config.json",
        "cli.json",
        "factors.safetensors",
        "covariance.safetensors",
        "index",
        "report.html",
    ):
        assert re.search(rf"^OK +\S*{re.escape(artifact)}$", out, re.M), artifact


def _damage_cases() -> list:
    run = _run_file
    targets = {
        "config": lambda wd: wd / "config.json",
        "cli": lambda wd: wd / "cli.json",
        "factors": lambda wd: wd / "factors.safetensors",
        "covariance": lambda wd: wd / "covariance.safetensors",
        "cached scores": _cached,
        "run scores": run("scores.safetensors"),
        "results": run("results.jsonl"),
        "run.json": run("run.json"),
        "report": run("report.html"),
        "analysis": run("analysis.json"),
        "manifest": lambda wd: wd / "index" / "manifest.json",
        "shard": _shard,
    }
    damages = {
        "flip": lambda p: flip(p, len(p.read_bytes()) // 2, 0x10),
        "truncation": truncate,
        "missing": Path.unlink,
    }
    cases = []
    for name, where in targets.items():
        for how, damage in damages.items():
            if how == "missing" and name in ("covariance", "cached scores", "cli", "analysis"):
                continue  # optional files: their absence is not damage
            cases.append(pytest.param(where, damage, how, id=f"{name}-{how}"))
    return cases


@pytest.mark.parametrize("where, damage, how", _damage_cases())
def test_verify_flags_exactly_the_damaged_artifact(
    base: Path, tmp_path: Path, where: Callable[[Path], Path], damage: Callable[[Path], None], how: str
) -> None:
    wd = copy(base, tmp_path / "wd")
    target = where(wd)
    damage(target)
    code, bad = verify(wd)
    assert code == 1
    rel = str(target.relative_to(wd))
    if rel.startswith("index/") and not (how == "missing" and target.name == "manifest.json"):
        key, status = "index", "CORRUPT"  # the index is judged as one artifact; the message names the file
    else:
        key, status = rel, "MISSING" if how == "missing" else "CORRUPT"
    assert list(bad) == [key], bad
    assert bad[key][0] == status, bad
    detail = bad[key][1]
    assert status == "MISSING" or target.name in detail, detail
    assert re.search(r"rerun|refit|rebuild|delete|overwrite|run `headwater", detail), detail


def test_verify_flags_what_a_changed_data_file_makes_stale(files: dict, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(files["train"], data)
    wd = tmp_path / "wd"
    assert_ok(invoke(*fit_args(files, wd, data=data)))
    assert_ok(invoke(*score_args(files, wd)))
    assert_ok(invoke("index", "build", "--workdir", wd, "--dim", 4, "--quiet"))
    assert verify(wd) == (0, {})
    data.write_text(data.read_text().replace("The", "A", 1))
    code, bad = verify(wd)
    run = str(the_run(wd).relative_to(wd))
    assert code == 1 and set(bad) == {"factors.safetensors", run, "index"}, bad
    assert all(status == "STALE" for status, _ in bad.values())
    assert "changed since the fit" in bad["factors.safetensors"][1] and "--overwrite" in bad["factors.safetensors"][1]
    data.unlink()  # now nothing can be compared with it, and score needs --data
    code, bad = verify(wd)
    assert code == 1 and list(bad) == [str(data.resolve())] and bad[str(data.resolve())][0] == "MISSING", bad


def test_verify_flags_a_run_scored_with_old_factors(files: dict, base: Path, tmp_path: Path) -> None:
    wd = copy(base, tmp_path / "wd")
    old = tmp_path / "old-run"
    shutil.copytree(the_run(wd), old)
    assert_ok(invoke(*fit_args(files, wd, "--overwrite", "--seed", 1)))
    assert_ok(invoke(*score_args(files, wd)))
    shutil.copytree(old, wd / "results" / "old-run")  # e.g. restored from a backup
    code, bad = verify(wd)
    assert code == 1 and list(bad) == ["results/old-run"], bad
    assert bad["results/old-run"][0] == "STALE" and "factors the workdir no longer holds" in bad["results/old-run"][1]
