"""Seeded fuzzing of everything headwater reads back: damaged artifacts and damaged inputs.

Each case truncates a file at a random length or flips random bits in it, then runs the commands
that read it. Every command must end in the clean result (byte for byte where the output is
deterministic) or in one ``headwater: error:`` line with exit status 2: never a traceback, never
a different result. ``headwater verify`` must call every damaged artifact out (exit 1).

Inputs (training JSONL, queries JSONL, parquet) are fuzzed through the readers, where damage
may legitimately leave a different but valid file: then the reader returns well-formed records
or raises ``InputError``, and only when the parsed content equals the clean one must the result
equal the clean result.

Bounded and seeded (``SEED``, ``ARTIFACT_CASES``, ``INPUT_CASES``): 20 s wall on this project's 2-core machine
when idle (`time python -m pytest tests/test_fuzz.py`), about 45 s while other jobs share the cores.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from headwater.cli import app
from headwater.io import InputError, read_documents, read_queries
from headwater.storage import load_tensors
from headwater.synthetic import make_corpus, train_tokenizer

SEED = 20261201
ARTIFACT_CASES = 60
INPUT_CASES = 120
runner = CliRunner()
OUTCOMES: dict[str, int] = {}  # what the fuzzing ended in, printed with -s (a test that only errs tests little)


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_ok_or_one_line_error(result: Result, context: str) -> bool:
    """True for exit 0; for anything else, exit 2 and one error line, no traceback; False then."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (context, repr(result.exception))
    assert "Traceback" not in result.output, (context, result.output)
    if result.exit_code == 0:
        OUTCOMES["clean result"] = OUTCOMES.get("clean result", 0) + 1
        return True
    OUTCOMES["one-line error"] = OUTCOMES.get("one-line error", 0) + 1
    assert result.exit_code == 2, (context, result.exit_code, result.output)
    lines = [x for x in re.split(r"[\r\n]+", result.stderr.strip()) if x.strip()]
    assert lines and lines[-1].startswith("headwater: error: "), (context, result.stderr)
    assert sum("error" in x for x in lines) == 1, (context, result.stderr)
    assert "rerun with --debug" not in lines[-1], (context, lines[-1])  # an expected error, not a crash
    return False


def damage(path: Path, rng: random.Random) -> str:
    """Truncate ``path`` or flip 1-3 random bits in it; returns what was done (for messages)."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.4:
        keep = rng.randrange(len(data))
        path.write_bytes(bytes(data[:keep]))
        return f"truncated to {keep} of {len(data)} bytes"
    where = []
    for _ in range(rng.randint(1, 3)):
        i, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        data[i] ^= bit
        where.append(f"{i}^{bit}")
    path.write_bytes(bytes(data))
    return "flipped " + ",".join(where)


# ---------------------------------------------------------------------------------------
# A workdir with every artifact, and the clean result of every reader
# ---------------------------------------------------------------------------------------


def _strip(html: str) -> str:
    return re.sub(r"generated [^.]*UTC", "", html)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("fuzz")
    corpus = make_corpus(seed=7, small=True)
    tok = train_tokenizer(corpus.docs, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus.docs[:8]))
    q = corpus.queries[0]
    (root / "queries.jsonl").write_text(json.dumps({"prompt": q["prompt"], "completion": q["completion"]}) + "\n")
    wd = root / "wd"
    fit = ["fit", "--model", root / "model", "--data", root / "train.jsonl", "--workdir", wd, "--quiet"]
    assert invoke(*fit, "--keep-covariance").exit_code == 0
    assert invoke(*_score(root, wd, root / "first")).exit_code == 0
    run = root / "first"
    assert invoke("analyze", run, "--quiet").exit_code == 0
    assert invoke("index", "build", "--workdir", wd, "--dim", 4, "--quiet").exit_code == 0
    # the clean result of every reader
    assert invoke(*_score(root, wd, root / "clean_score")).exit_code == 0
    assert invoke("report", run, "--out", root / "clean.html", "--quiet").exit_code == 0
    assert invoke(*_query(root, wd, root / "clean_query")).exit_code == 0
    inspect = invoke("inspect", wd, "--json")
    assert invoke("verify", wd).exit_code == 0
    # the run lives inside the workdir's tree for the copies below
    shutil.move(run, wd / "results" / "fuzzed-run")
    return {
        "root": root,
        "wd": wd,
        "fit": fit,
        "factors": load_tensors(wd / "factors.safetensors")[0],
        "score": (root / "clean_score" / "results.jsonl").read_text(),
        "report": _strip((root / "clean.html").read_text()),
        "analysis": _analysis(wd / "results" / "fuzzed-run"),
        "query": (root / "clean_query" / "results.jsonl").read_text(),
        "inspect": _inspect(json.loads(inspect.stdout)),
        "docs": read_documents(root / "train.jsonl"),
        "queries": read_queries(root / "queries.jsonl"),
    }


def _score(root: Path, wd: Path, out: Path, queries: Path | None = None) -> list:
    q = queries or root / "queries.jsonl"
    return ["score", "--workdir", wd, "--queries", q, "--top-k", 2, "--query-rank", 0, "--out", out, "--quiet"]


def _query(root: Path, wd: Path, out: Path) -> list:
    return ["index", "query", "--workdir", wd, "--queries", root / "queries.jsonl", "--out", out, "--quiet"]


def _analysis(run: Path) -> dict:
    res = json.loads((run / "analysis.json").read_text())
    return {k: v for k, v in res.items() if k not in ("directory", "checksum")}


def _inspect(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("workdir", "files", "runs")}


# ---------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------

# artifact -> (its path in the workdir, the commands that read it)
ARTIFACTS = {
    "factors": ("factors.safetensors", ("score", "inspect")),
    "covariance": ("covariance.safetensors", ("resume fit",)),
    "cached scores": ("scores/*.safetensors", ("score",)),
    "run scores": ("results/fuzzed-run/scores.safetensors", ("report", "analyze")),
    "results.jsonl": ("results/fuzzed-run/results.jsonl", ("report", "analyze")),
    "run.json": ("results/fuzzed-run/run.json", ("report", "analyze")),
    "report.html": ("results/fuzzed-run/report.html", ()),
    "analysis.json": ("results/fuzzed-run/analysis.json", ()),
    "config.json": ("config.json", ("score", "inspect")),
    "cli.json": ("cli.json", ("score", "inspect")),
    "manifest": ("index/manifest.json", ("index query", "index build")),
    "source": ("index/source.json", ("index query", "index build")),
    "shard": ("index/shard-*.bin", ("index query", "index build")),
    "projections": ("index/projections.safetensors", ("index query", "index build")),
    "index curvature": ("index/curvature.safetensors", ("index query", "index build")),
}


def _run(world: dict, wd: Path, command: str, out: Path, context: str) -> None:
    """Run one reader on the damaged copy; a success must reproduce the clean result exactly."""
    root = world["root"]
    run = wd / "results" / "fuzzed-run"
    if command == "score":
        res = invoke(*_score(root, wd, out))
        if assert_ok_or_one_line_error(res, context):
            assert (out / "results.jsonl").read_text() == world["score"], context
    elif command == "inspect":
        res = invoke("inspect", wd, "--json")
        if assert_ok_or_one_line_error(res, context):
            assert _inspect(json.loads(res.stdout)) == world["inspect"], context
    elif command == "resume fit":
        (wd / "factors.safetensors").unlink(missing_ok=True)  # killed after the covariance pass
        fit = [wd if a == world["wd"] else a for a in world["fit"]]
        if assert_ok_or_one_line_error(invoke(*fit, "--keep-covariance"), context):
            got = load_tensors(wd / "factors.safetensors")[0]
            assert got.keys() == world["factors"].keys(), context
            assert all(torch.equal(got[k], world["factors"][k]) for k in got), context
    elif command == "report":
        if assert_ok_or_one_line_error(invoke("report", run, "--out", out / "r.html", "--quiet"), context):
            assert _strip((out / "r.html").read_text()) == world["report"], context
    elif command == "analyze":
        if assert_ok_or_one_line_error(invoke("analyze", run, "--quiet"), context):
            assert _analysis(run) == world["analysis"], context
    elif command == "index query":
        if assert_ok_or_one_line_error(invoke(*_query(root, wd, out)), context):
            assert (out / "results.jsonl").read_text() == world["query"], context
    elif command == "index build":  # rewrites a damaged shard or curvature file; the rest needs --overwrite
        build = ["index", "build", "--workdir", wd, "--dim", 4, "--quiet"]
        if assert_ok_or_one_line_error(invoke(*build), context):
            assert assert_ok_or_one_line_error(invoke(*_query(root, wd, out)), context), context
            assert (out / "results.jsonl").read_text() == world["query"], context
    else:  # pragma: no cover
        raise AssertionError(command)


def test_damaged_artifacts_give_the_clean_result_or_one_line(world: dict, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    names = sorted(ARTIFACTS)
    for case in range(ARTIFACT_CASES):
        name = names[case % len(names)] if case < len(names) else rng.choice(names)
        pattern, commands = ARTIFACTS[name]
        wd = tmp_path / f"case{case}"
        shutil.copytree(world["wd"], wd)
        (target,) = wd.glob(pattern)
        how = damage(target, rng)
        context = f"case {case}: {name} {how}"
        res = invoke("verify", wd)
        assert res.exit_code == 1 and "Traceback" not in res.output, (context, res.output)
        rel = str(target.relative_to(wd))
        flagged = [x for x in res.stdout.splitlines() if not x.startswith("OK") and re.match(r"[A-Z]+ ", x)]
        assert any(rel in x or (rel.startswith("index/") and "/index" in x) for x in flagged), (context, flagged)
        for command in commands:
            _run(world, wd, command, tmp_path / f"out{case}-{command.replace(' ', '_')}", f"{context}, {command}")
        shutil.rmtree(wd)
    print(f"artifact fuzzing: {OUTCOMES}")


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def _well_formed(records: object, queries: bool) -> None:
    assert len(records) > 0
    for i in range(len(records)):
        r = records[i]
        assert isinstance(r, dict)
        if queries:
            assert isinstance(r["prompt"], str) and isinstance(r["completion"], str) and r["completion"]
        elif "text" in r:
            assert isinstance(r["text"], str) and r["text"].strip()
        elif "prompt" in r:
            assert isinstance(r["prompt"], str) and isinstance(r["completion"], str)
        else:
            assert all(isinstance(t, int) for t in r["input_ids"])


def test_damaged_inputs_are_read_or_refused_by_file(world: dict, tmp_path: Path) -> None:
    import datasets

    rng = random.Random(SEED + 1)
    root = world["root"]
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"text": [d["text"] for d in world["docs"]]}).to_parquet(str(parquet))
    sources = {"train.jsonl": root / "train.jsonl", "queries.jsonl": root / "queries.jsonl", "train.parquet": parquet}
    cli_runs = 0
    for case in range(INPUT_CASES):
        name = list(sources)[case % len(sources)]
        path = tmp_path / f"{case}-{name}"
        shutil.copy(sources[name], path)
        how = damage(path, rng)
        context = f"case {case}: {name} {how}"
        queries = name == "queries.jsonl"
        try:
            got = read_queries(path) if queries else read_documents(path)
        except InputError as e:
            assert str(path) in str(e) and "\n" not in str(e), (context, str(e))
            OUTCOMES["input refused"] = OUTCOMES.get("input refused", 0) + 1
            continue
        OUTCOMES["input read"] = OUTCOMES.get("input read", 0) + 1
        _well_formed(got, queries)
        clean = world["queries"] if queries else world["docs"]
        same = len(got) == len(clean) and all(got[i] == clean[i] for i in range(len(got)))
        if queries and cli_runs < 6:  # the command on it: the clean result exactly, or one line
            cli_runs += 1
            out = tmp_path / f"out{case}"
            res = invoke(*_score(root, world["wd"], out, queries=path))
            if assert_ok_or_one_line_error(res, context) and same:
                assert (out / "results.jsonl").read_text() == world["score"], context
    print(f"input fuzzing: {OUTCOMES}")
