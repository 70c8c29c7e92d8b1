"""The built-in demo: corpus ground truth, the local tokenizer, and a reduced run end to end.

The reduced run (``demo_run`` in conftest) goes through ``headwater demo --small``; its printed
recall and top-3 lists are checked against the saved score matrix and the corpus's ground
truth, and its per-token and per-layer scores against the scores they decompose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headwater.cli import app
from headwater.demo import FULL, SMALL, demo_is_small, make_corpus, train_tokenizer
from headwater.storage import load_tensors


def _states(doc: str, entity: str, value: str) -> bool:
    return entity in doc and re.search(rf"\b{re.escape(value)}\b", doc) is not None


@pytest.mark.parametrize("small", [True, False])
def test_corpus_records_exact_ground_truth(small: bool) -> None:
    c = make_corpus(seed=0, small=small)
    cfg = SMALL if small else FULL
    assert len(c.facts) == len(c.queries) == 3 * cfg.n_entities
    assert len({f.value for f in c.facts}) == len(c.facts), "values must be unique for exact ground truth"
    for f in c.facts:
        rel = c.relevant(f.id)
        assert len(rel) == cfg.n_paraphrases
        assert all(_states(c.docs[j], f.entity, f.value) for j in rel)
    # a document mentions a person together with a value only if it states that very fact
    for j, doc in enumerate(c.docs):
        stated = [f.id for f in c.facts if _states(doc, f.entity, f.value)]
        assert stated == ([] if c.doc_facts[j] is None else [c.doc_facts[j]])
    # each query is the first paraphrase's prefix, answered by its completion
    for q in c.queries:
        assert any(q["prompt"] + q["completion"] in c.docs[j] for j in c.relevant(q["fact"]))
    # hard negatives exist: documents containing a birthplace without the person
    cities = {f.value for f in c.facts if f.relation == "birthplace"}
    assert sum(1 for j, d in enumerate(c.docs) if c.doc_facts[j] is None and any(v in d for v in cities)) >= len(cities)


def test_corpus_is_deterministic_in_seed() -> None:
    assert make_corpus(seed=0, small=True).docs == make_corpus(seed=0, small=True).docs
    assert make_corpus(seed=0, small=True).docs != make_corpus(seed=1, small=True).docs


def test_tokenizer_round_trips_and_decodes_token_by_token() -> None:
    docs = make_corpus(seed=0, small=True).docs
    tok = train_tokenizer(docs, vocab_size=300)
    assert len(tok) <= 300
    for d in docs[:40]:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == d
        assert "".join(tok.decode([i]) for i in ids) == d  # what the report's heatmaps rely on


def test_demo_small_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake_run_demo(out, small=False, quiet=False, seed=0):  # noqa: ANN001
        seen.update(out=out, small=small, quiet=quiet, seed=seed)
        return {}

    monkeypatch.setattr("headwater.demo.run_demo", fake_run_demo)
    monkeypatch.setenv("HEADWATER_DEMO_SMALL", "1")
    assert demo_is_small()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen["small"] is True and seen["quiet"] is True and Path(seen["out"]) == tmp_path / "d"
    monkeypatch.setenv("HEADWATER_DEMO_SMALL", "0")
    assert not demo_is_small()


def test_demo_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--small", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not empty and holds no previous demo" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------
# The reduced run, end to end
# ---------------------------------------------------------------------------------------


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_demo_run_writes_everything(demo_run) -> None:  # noqa: ANN001
    out, result = demo_run
    assert result.exit_code == 0, result.output
    for name in (
        "report.html",
        "results.jsonl",
        "scores.safetensors",
        "factors.safetensors",
        "cli.json",
        "demo.json",
        "train.jsonl",
        "queries.jsonl",
        "model/config.json",
        "model/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.part")), "no temporary files may be left behind"
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "heatmap" in html


def test_demo_recall_matches_scores_and_ground_truth(demo_run) -> None:  # noqa: ANN001
    out, result = demo_run
    corpus = make_corpus(seed=0, small=True)
    train = [json.loads(line)["text"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert train == corpus.docs
    values = load_tensors(out / "scores.safetensors")[0]["values"]  # [Q, N]
    assert values.shape == (len(corpus.queries), len(corpus.docs))
    top10 = values.topk(10, dim=1).indices
    recalls = [
        len(set(corpus.relevant(q["fact"])) & set(top10[i].tolist())) / SMALL.n_paraphrases
        for i, q in enumerate(corpus.queries)
    ]
    recall = sum(recalls) / len(recalls)
    printed = float(re.search(r"recall@10 = ([0-9.]+)", result.stdout).group(1))
    assert printed == pytest.approx(recall, abs=5e-4)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["recall@10"] == pytest.approx(recall)
    assert recall >= 0.7, f"EK-FAC should find most fact documents even in the reduced demo, got {recall}"

    # the terminal's top 3 per query are the three largest scores, in order
    blocks = re.findall(r"->.*?\n((?:    \d\. .*\n){3})", result.stdout)
    assert len(blocks) == len(corpus.queries)
    for i, block in enumerate(blocks):
        shown = [int(x) for x in re.findall(r"#(\d+)", block)]
        assert shown == values[i].topk(3).indices.tolist()


def test_demo_model_learned_the_facts(demo_run) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = demo_run
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    queries = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    hits = 0
    with torch.no_grad():
        for q in queries:
            p = tok(q["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(q["completion"], add_special_tokens=False)["input_ids"]
            pred = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
            hits += pred == c
    summary = json.loads((out / "demo.json").read_text())
    assert summary["query_accuracy"] == pytest.approx(hits / len(queries))
    assert hits / len(queries) >= 0.5


def test_demo_token_and_layer_scores_decompose_the_score(demo_run) -> None:  # noqa: ANN001
    out, _ = demo_run
    tensors, meta = load_tensors(out / "scores.safetensors")
    values = tensors["values"]
    scale = values.abs().max().item()
    for r in _results(out):
        for e in r["top"] + r["bottom"]:
            assert e["score"] == pytest.approx(values[r["query"], e["index"]].item(), rel=1e-6)
            # per-token scores come from a separate per_token=True pass over the shown rows
            assert sum(e["token_scores"]) == pytest.approx(e["score"], rel=1e-3, abs=1e-5 * scale)
            assert sum(e["per_layer"].values()) == pytest.approx(e["score"], rel=1e-4, abs=1e-6 * scale)
            assert len(e["tokens"]) == len(e["token_scores"])
            assert "".join(e["tokens"]) == e["text"]
            assert e["token_scores"][0] == 0.0  # nothing predicts the first token
    assert meta["layers"] == [n for n in json.loads((out / "cli.json").read_text())["layers"]]
