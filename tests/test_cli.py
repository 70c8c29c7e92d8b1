"""The ``headwater`` command on a local HF model directory made here with ``save_pretrained``.

Happy paths are compared with the Python API computing the same thing; every error case
checks exit status 2, the one-line message on stderr, and that no traceback is printed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headwater as hw
from headwater.cli import app
from headwater.demo import make_corpus, train_tokenizer
from headwater.io import InputError, read_documents, read_queries
from headwater.storage import load_tensors

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def assert_error(result, message: str) -> None:  # noqa: ANN001
    """Exit status 2, one readable line on stderr that contains ``message``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.stderr, result.stderr
    # progress bars may precede it; the error itself is exactly one line, the last one
    lines = re.split(r"[\r\n]+", result.stderr.strip())
    errors = [x for x in lines if "error" in x]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert lines[-1].startswith("headwater: error: "), lines[-1]
    assert re.search(message, lines[-1]), lines[-1]


def _save_model(path: Path, tok, seed: int) -> None:  # noqa: ANN001
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
    """Two tiny GPT-2 directories (same tokenizer, different weights), data and queries."""
    root = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(seed=3, small=True)
    docs = corpus.docs[:20]
    tok = train_tokenizer(corpus.docs, vocab_size=300)
    _save_model(root / "model_a", tok, seed=0)
    _save_model(root / "model_b", tok, seed=1)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in corpus.queries[:3]]
    queries[0]["relevant"] = [0, 1]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return {
        "root": root,
        "model_a": root / "model_a",
        "model_b": root / "model_b",
        "train": root / "train.jsonl",
        "queries": root / "queries.jsonl",
    }


@pytest.fixture(scope="module")
def scored(files: dict[str, Path]) -> dict:
    """fit + score (exact query gradients, top 4) once; the tests below read what they wrote."""
    wd = files["root"] / "wd"
    fit = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        files["train"],
        "--workdir",
        wd,
        "--batch-size",
        8,
        "--max-length",
        40,
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    sc = invoke(
        "score", "--workdir", wd, "--out", wd, "--queries", files["queries"], "--top-k", 4, "--query-rank", 0, "--quiet"
    )
    assert sc.exit_code == 0, sc.output
    return {"wd": wd, "fit": fit, "score": sc}


def _reference(files: dict[str, Path]) -> hw.Scores:
    """The same scores through the Python API, from the saved model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["model_a"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(files["model_a"], local_files_only=True)
    docs = [{"text": json.loads(x)["text"]} for x in files["train"].read_text().splitlines()]
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in read_queries(files["queries"])]
    an = hw.Attributor(
        model, task=hw.LanguageModelingTask(tokenizer=tok, max_length=40), strategy="ekfac", modules="mlp", seed=0
    )
    an.fit(docs, batch_size=8)
    return an.scores(queries, docs, batch_size=8, per_layer=True)


# ---------------------------------------------------------------------------------------
# fit / score / report / inspect
# ---------------------------------------------------------------------------------------


def test_fit_records_what_score_needs(files: dict[str, Path], scored: dict) -> None:
    settings = json.loads((scored["wd"] / "cli.json").read_text())
    assert settings["model"] == str(files["model_a"].resolve())
    assert settings["tokenizer"] == str(files["model_a"].resolve())
    assert settings["data"] == str(files["train"].resolve())
    assert settings["max_length"] == 40 and settings["n_train"] == 20 and settings["strategy"] == "ekfac"
    assert settings["layers"] == [f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj")]
    assert (scored["wd"] / "factors.safetensors").is_file()


def test_score_matches_the_python_api(files: dict[str, Path], scored: dict) -> None:
    ref = _reference(files)
    tensors, meta = load_tensors(scored["wd"] / "scores.safetensors")
    torch.testing.assert_close(tensors["values"], ref.values, rtol=1e-4, atol=1e-6 * ref.values.abs().max().item())
    for name, t in ref.per_layer.items():
        torch.testing.assert_close(tensors[f"per_layer::{name}"], t, rtol=1e-4, atol=1e-6 * t.abs().max().item())
    assert meta["top_k"] == 4 and meta["query_rank"] is None and meta["n_train"] == 20


def test_results_list_top_and_bottom_with_decomposed_scores(files: dict[str, Path], scored: dict) -> None:
    values = load_tensors(scored["wd"] / "scores.safetensors")[0]["values"]
    docs = [json.loads(x)["text"] for x in files["train"].read_text().splitlines()]
    rows = [json.loads(x) for x in (scored["wd"] / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for q, r in enumerate(rows):
        assert [e["index"] for e in r["top"]] == values[q].topk(4).indices.tolist()
        assert [e["index"] for e in r["bottom"]] == (-values[q]).topk(4).indices.tolist()
        for e in r["top"] + r["bottom"]:
            assert e["text"] == docs[e["index"]]
            assert e["score"] == pytest.approx(values[q, e["index"]].item(), rel=1e-6)
            assert sum(e["token_scores"]) == pytest.approx(e["score"], rel=1e-3, abs=1e-6)
            assert sum(e["per_layer"].values()) == pytest.approx(e["score"], rel=1e-4, abs=1e-7)
    top = set(values[0].topk(4).indices.tolist())
    assert rows[0]["recall"] == pytest.approx(len(top & {0, 1}) / 2) and "recall" not in rows[1]
    # the command prints each query's best training document
    assert f"#{rows[0]['top'][0]['index']}" in scored["score"].stdout


def test_per_token_flag_saves_full_tensor_and_agrees(files: dict[str, Path], scored: dict) -> None:
    wd = scored["wd"]
    before = [json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()]
    res = invoke(
        "score",
        "--workdir",
        wd,
        "--out",
        wd,
        "--queries",
        files["queries"],
        "--top-k",
        4,
        "--query-rank",
        0,
        "--per-token",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    tensors, meta = load_tensors(wd / "scores.safetensors")
    per_token = tensors["per_token"]  # [Q, N, T]
    assert per_token.shape[:2] == (3, 20) and meta["per_token"] is True
    torch.testing.assert_close(per_token.sum(-1), tensors["values"], rtol=1e-3, atol=1e-6)
    after = [json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()]
    for r0, r1 in zip(before, after):  # sliced from [Q, N, T] vs re-scored subsets: the same numbers
        for e0, e1 in zip(r0["top"] + r0["bottom"], r1["top"] + r1["bottom"]):
            assert e0["index"] == e1["index"]
            assert e1["token_scores"] == pytest.approx(e0["token_scores"], rel=1e-3, abs=1e-7)


def test_identity_strategy_with_low_rank_queries(files: dict[str, Path], tmp_path: Path) -> None:
    """No factors to fit; rank-4 query gradients in the main pass and in the per-token re-scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wd = tmp_path / "wd"
    fit = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        files["train"],
        "--workdir",
        wd,
        "--strategy",
        "identity",
        "--max-length",
        40,
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    res = invoke(
        "score", "--workdir", wd, "--out", wd, "--queries", files["queries"], "--top-k", 3, "--query-rank", 4, "--quiet"
    )
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(files["model_a"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(files["model_a"], local_files_only=True)
    docs = read_documents(files["train"])
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in read_queries(files["queries"])]
    an = hw.Attributor(
        model, task=hw.LanguageModelingTask(tokenizer=tok, max_length=40), strategy="identity", modules="mlp"
    )
    ref = an.scores(queries, docs, batch_size=8, query_rank=4)
    values = load_tensors(wd / "scores.safetensors")[0]["values"]
    torch.testing.assert_close(values, ref.values, rtol=1e-4, atol=1e-6 * ref.values.abs().max().item())
    for r in (json.loads(x) for x in (wd / "results.jsonl").read_text().splitlines()):
        for e in r["top"] + r["bottom"]:
            assert sum(e["token_scores"]) == pytest.approx(e["score"], rel=1e-3, abs=1e-6 * values.abs().max().item())
    assert json.loads(invoke("inspect", wd, "--json").stdout)["fitted"] is True


def test_fisher_options_are_recorded_and_reused_by_score(files: dict[str, Path], tmp_path: Path) -> None:
    """--fisher/--samples/--top reach the engine at fit time, and score reopens the same workdir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wd = tmp_path / "wd"
    fit = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        files["train"],
        "--workdir",
        wd,
        "--fisher",
        "topk",
        "--samples",
        2,
        "--top",
        3,
        "--max-length",
        40,
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    settings = json.loads((wd / "cli.json").read_text())
    assert (settings["fisher"], settings["samples"], settings["top"]) == ("topk", 2, 3)
    config = json.loads((wd / "config.json").read_text())
    assert (config["fisher"], config["samples"], config["top"]) == ("topk", 2, 3)
    res = invoke("score", "--workdir", wd, "--out", wd, "--queries", files["queries"], "--top-k", 2, "--quiet")
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(files["model_a"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(files["model_a"], local_files_only=True)
    an = hw.Attributor(
        model,
        task=hw.LanguageModelingTask(tokenizer=tok, max_length=40),
        modules="mlp",
        fisher="topk",
        samples=2,
        top=3,
    )
    an.fit(read_documents(files["train"]), batch_size=8)
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in read_queries(files["queries"])]
    ref = an.scores(queries, read_documents(files["train"]), batch_size=8)
    values = load_tensors(wd / "scores.safetensors")[0]["values"]
    torch.testing.assert_close(values, ref.values, rtol=1e-4, atol=1e-6 * ref.values.abs().max().item())
    other = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        files["train"],
        "--workdir",
        wd,
        "--fisher",
        "sampled",
        "--max-length",
        40,
        "--quiet",
    )
    assert other.exit_code == 2 and "fisher" in other.output


def test_report_regenerates_from_saved_files(scored: dict, tmp_path: Path) -> None:
    wd = scored["wd"]
    strip = lambda s: re.sub(r"generated [^.]*UTC", "", s)  # noqa: E731
    original = strip((wd / "report.html").read_text())
    res = invoke("report", wd, "--out", tmp_path / "again.html", "--quiet")
    assert res.exit_code == 0, res.output
    assert strip((tmp_path / "again.html").read_text()) == original
    assert original.count('class="seq"') == 3 * 8  # top 4 + bottom 4 per query


def test_inspect_reports_spectra_from_the_factors(scored: dict) -> None:
    wd = scored["wd"]
    res = invoke("inspect", wd, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    factors, _ = load_tensors(wd / "factors.safetensors")
    assert info["strategy"] == "ekfac" and info["fitted"] and info["data"]["n_train"] == 20
    assert (info["fisher"], info["top"], info["samples"]) == ("topk", 8, 1)  # the default, resolved
    assert info["model"]["path"].endswith("model_a")
    assert [x["name"] for x in info["layers"]] == json.loads((wd / "cli.json").read_text())["layers"]
    for layer in info["layers"]:
        lam = factors[f"{layer['name']}::lam"].double()
        assert layer["shape"] == list(lam.shape)
        ev = layer["eigenvalues"]
        assert ev["mean"] == pytest.approx(lam.mean().item()) and ev["max"] == pytest.approx(lam.max().item())
        assert ev["damping"] == pytest.approx(0.1 * lam.mean().item())
    assert info["files"]["factors.safetensors"] == (wd / "factors.safetensors").stat().st_size
    table = invoke("inspect", wd)
    assert table.exit_code == 0 and "transformer.h.1.mlp.c_proj" in table.stdout and "eff.rank" in table.stdout
    assert "fisher=topk (top 8)" in table.stdout


def test_refit_on_same_inputs_is_a_no_op_and_other_data_needs_overwrite(files: dict[str, Path], scored: dict) -> None:
    wd = scored["wd"]
    mtime = (wd / "factors.safetensors").stat().st_mtime_ns
    again = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        files["train"],
        "--workdir",
        wd,
        "--batch-size",
        8,
        "--max-length",
        40,
        "--quiet",
    )
    assert again.exit_code == 0 and (wd / "factors.safetensors").stat().st_mtime_ns == mtime
    other = files["root"] / "other.txt"
    other.write_text("One more document here.\n\nAnd a second one, after a blank line.\n")
    res = invoke("fit", "--model", files["model_a"], "--data", other, "--workdir", wd, "--max-length", 40, "--quiet")
    assert_error(res, "already holds factors fitted on other data.*--overwrite")
    res = invoke(
        "fit", "--model", files["model_a"], "--data", files["train"], "--workdir", wd, "--max-length", 20, "--quiet"
    )
    assert_error(res, r"was fitted with max_length=40 \(now 20\); pass --overwrite")


def test_fit_accepts_plain_text_data(files: dict[str, Path], tmp_path: Path) -> None:
    text = files["root"] / "docs.txt"
    text.write_text("The first document.\nIt has two lines.\n\n\nThe second document.\n")
    res = invoke(
        "fit",
        "--model",
        files["model_a"],
        "--data",
        text,
        "--workdir",
        tmp_path / "wd",
        "--strategy",
        "kfac",
        "--modules",
        "transformer.h.1.mlp.c_fc",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "wd" / "cli.json").read_text())
    assert settings["n_train"] == 2 and settings["layers"] == ["transformer.h.1.mlp.c_fc"]


# ---------------------------------------------------------------------------------------
# Data readers
# ---------------------------------------------------------------------------------------


def test_readers_agree_across_formats(tmp_path: Path) -> None:
    import datasets

    texts = ["alpha beta", "gamma delta\nsecond line", "epsilon"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "meta": 1}) + "\n\n" for t in texts))
    (tmp_path / "d.txt").write_text("\n\n".join(texts) + "\n")
    ds = datasets.Dataset.from_dict({"text": texts, "other": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    expected = [{"text": t} for t in texts]
    assert read_documents(tmp_path / "d.jsonl") == expected
    assert read_documents(tmp_path / "d.txt") == expected
    for p in (tmp_path / "d.parquet", arrow, tmp_path / "saved"):
        got = read_documents(p)
        assert [got[i] for i in range(len(got))] == expected, p
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Q:", "completion": " A", "x": 0}) + "\n")
    assert read_documents(pc) == [{"prompt": "Q:", "completion": " A"}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', r"line 3: not valid JSON"),
        ('{"text": "ok"}\n{"body": "no text"}\n', r"line 2: no 'text' field \(found keys \['body'\]\)"),
        ('{"text": ""}\n', r"line 1: 'text' is empty"),
        ('{"text": 5}\n', r"line 1: 'text' must be a string"),
        ("[1, 2]\n", r"line 1: expected a JSON object"),
        ('{"prompt": "a"}\n', r"line 1: a prompt/completion example needs both"),
    ],
)
def test_reader_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(InputError, match=message):
        read_documents(p)


def test_table_without_text_column(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": ["a"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(InputError, match=r"has no 'text' column \(columns: \['body'\]\)"):
        read_documents(tmp_path / "t.parquet")


# ---------------------------------------------------------------------------------------
# Errors: exit status 2 and one line
# ---------------------------------------------------------------------------------------


def test_missing_data_file(files: dict[str, Path], tmp_path: Path) -> None:
    res = invoke("fit", "--model", files["model_a"], "--data", tmp_path / "nope.jsonl", "--workdir", tmp_path / "w")
    assert_error(res, r"data file .*nope\.jsonl does not exist")
    assert not (tmp_path / "w").exists()


def test_missing_queries_file(scored: dict, tmp_path: Path) -> None:
    res = invoke("score", "--workdir", scored["wd"], "--queries", tmp_path / "q.jsonl")
    assert_error(res, r"queries file .*q\.jsonl does not exist")


def test_malformed_jsonl_line(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": "unterminated}\n')
    res = invoke("fit", "--model", files["model_a"], "--data", bad, "--workdir", tmp_path / "w")
    assert_error(res, r"bad\.jsonl, line 4: not valid JSON")


def test_malformed_query_line(scored: dict, tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "only a prompt"}\n')
    res = invoke("score", "--workdir", scored["wd"], "--queries", q)
    assert_error(res, r"q\.jsonl, line 2: a query needs string fields 'prompt' and 'completion'")


def test_empty_dataset(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    res = invoke("fit", "--model", files["model_a"], "--data", empty, "--workdir", tmp_path / "w")
    assert_error(res, r"data file .*empty\.jsonl contains no documents")
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    assert_error(
        invoke("fit", "--model", files["model_a"], "--data", blank, "--workdir", tmp_path / "w"),
        "contains no documents",
    )


def test_empty_queries(scored: dict, tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text("")
    assert_error(invoke("score", "--workdir", scored["wd"], "--queries", q), r"contains no queries")


def test_missing_model_directory(files: dict[str, Path], tmp_path: Path) -> None:
    res = invoke("fit", "--model", tmp_path / "no_model", "--data", files["train"], "--workdir", tmp_path / "w")
    assert_error(res, r"model directory .*no_model does not exist")


def test_unloadable_model(files: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    res = invoke("fit", "--model", broken, "--data", files["train"], "--workdir", tmp_path / "w")
    assert_error(res, r"cannot load a causal language model from .*broken")
    assert not (tmp_path / "w").exists()


def test_unloadable_tokenizer(files: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    res = invoke(
        "fit", "--model", files["model_a"], "--tokenizer", empty, "--data", files["train"], "--workdir", tmp_path / "w"
    )
    assert_error(res, r"cannot load a tokenizer from .*no_tokenizer")


def test_workdir_from_another_model(files: dict[str, Path], scored: dict, tmp_path: Path) -> None:
    res = invoke(
        "fit",
        "--model",
        files["model_b"],
        "--data",
        files["train"],
        "--workdir",
        scored["wd"],
        "--max-length",
        40,
        "--quiet",
    )
    assert_error(res, r"workdir .* was made for another model")
    # and at score time, when the model directory the workdir records has changed since fit
    import shutil

    wd = tmp_path / "wd"
    moved = tmp_path / "model"
    shutil.copytree(files["model_a"], moved)
    assert invoke("fit", "--model", moved, "--data", files["train"], "--workdir", wd, "--quiet").exit_code == 0
    shutil.rmtree(moved)
    shutil.copytree(files["model_b"], moved)
    res = invoke("score", "--workdir", wd, "--queries", files["queries"], "--quiet")
    assert_error(res, "was made for another model")


def test_score_and_report_need_a_workdir(files: dict[str, Path], tmp_path: Path) -> None:
    assert_error(invoke("score", "--workdir", tmp_path / "nowhere", "--queries", files["queries"]), "does not exist")
    (tmp_path / "plain").mkdir()
    assert_error(
        invoke("score", "--workdir", tmp_path / "plain", "--queries", files["queries"]),
        r"not a fitted headwater workdir \(no cli\.json\)",
    )
    assert_error(invoke("report", tmp_path / "plain"), r"not a fitted headwater workdir")
    assert_error(invoke("inspect", tmp_path / "plain"), r"not a headwater workdir \(no config\.json\)")


def test_max_length_beyond_context(files: dict[str, Path], tmp_path: Path) -> None:
    res = invoke(
        "fit", "--model", files["model_a"], "--data", files["train"], "--workdir", tmp_path / "w", "--max-length", 4096
    )
    assert_error(res, r"--max-length 4096 exceeds the model's context length 48")


def test_debug_shows_the_exception(files: dict[str, Path], tmp_path: Path) -> None:
    res = invoke("fit", "--debug", "--model", tmp_path / "none", "--data", files["train"], "--workdir", tmp_path)
    assert res.exit_code != 0 and isinstance(res.exception, InputError)
    res = invoke("--debug", "fit", "--model", tmp_path / "none", "--data", files["train"], "--workdir", tmp_path)
    assert isinstance(res.exception, InputError)


def test_interrupted_score_leaves_no_partial_files(
    files: dict[str, Path], scored: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(scored["wd"], wd)
    for name in ("scores.safetensors", "results.jsonl", "report.html"):
        (wd / name).unlink()

    def interrupt(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr("headwater.report.render_report", interrupt)
    res = invoke("score", "--workdir", wd, "--out", wd, "--queries", files["queries"], "--query-rank", 0, "--quiet")
    assert res.exit_code == 130 and "interrupted" in res.stderr
    assert not (wd / "scores.safetensors").exists() and not (wd / "results.jsonl").exists()
    assert not (wd / "report.html").exists()
    assert not [p for p in wd.rglob("*") if p.name.endswith(".part")]


def test_help_on_every_command() -> None:
    groups = (
        ["analyze"],
        ["evaluate"],
        ["evaluate", "lds"],
        ["evaluate", "pbrf"],
        ["evaluate", "retrieval"],
        ["index"],
        ["index", "build"],
        ["index", "query"],
    )
    for cmd in ([], ["demo"], ["fit"], ["score"], ["report"], ["inspect"], *groups):
        res = invoke(*cmd, "--help")
        assert res.exit_code == 0 and "Usage:" in res.stdout, cmd


def test_candidates_score_only_bm25_candidates_and_analyze_reads_the_run(
    files: dict[str, Path], scored: dict, tmp_path: Path
) -> None:
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(scored["wd"], wd)
    res = invoke(
        "score",
        "--workdir",
        wd,
        "--out",
        wd,
        "--queries",
        files["queries"],
        "--top-k",
        2,
        "--query-rank",
        0,
        "--candidates",
        3,
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    tensors, _ = load_tensors(wd / "scores.safetensors")
    assert tensors["mask"].sum(1).tolist() == [3, 3, 3]
    full, _ = load_tensors(scored["wd"] / "scores.safetensors")
    torch.testing.assert_close(tensors["values"][tensors["mask"]], full["values"][tensors["mask"]])
    for row in map(json.loads, (wd / "results.jsonl").read_text().splitlines()):
        assert all(tensors["mask"][row["query"], e["index"]] for e in row["top"])
    out = invoke("analyze", str(wd))
    assert out.exit_code == 0, out.output
    analysis = json.loads((wd / "analysis.json").read_text())
    assert analysis["n_queries"] == 3 and analysis["n_train"] == 20
