"""``--task seq-cls`` and ``--task seq2seq`` and a PEFT adapter directory through the command line,
compared with the Python API computing the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headwater as hw
from headwater.cli import app
from headwater.io import query_example, read_documents, read_queries
from headwater.storage import load_tensors
from headwater.synthetic import make_corpus, train_tokenizer


def invoke(*args):  # noqa: ANN201
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return train_tokenizer(make_corpus(seed=3, small=True).docs, vocab_size=200)


def _texts(n: int) -> list[str]:
    return make_corpus(seed=3, small=True).docs[:n]


def _compare(wd: Path, run: Path, an: hw.Attributor, queries: list, docs: list) -> None:
    values = load_tensors(run / "scores.safetensors")[0]["values"]
    ref = an.scores(queries, docs, batch_size=4, query_rank=None).values
    torch.testing.assert_close(values, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_sequence_classification_from_the_command_line(tmp_path: Path, tok) -> None:  # noqa: ANN001
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=tok.pad_token_id,
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(_texts(12))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    wd = tmp_path / "wd"
    fit = invoke(
        "fit",
        "--model",
        tmp_path / "model",
        "--data",
        tmp_path / "train.jsonl",
        "--workdir",
        wd,
        "--task",
        "seq-cls",
        "--batch-size",
        4,
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    res = invoke(
        "score", "--workdir", wd, "--queries", tmp_path / "q.jsonl", "--out", wd / "run", "--query-rank", 0, "--quiet"
    )
    assert res.exit_code == 0, res.output
    model = BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    an = hw.Attributor(model, task=hw.SequenceClassificationTask(tok, max_length=64), modules="mlp")
    docs = read_documents(tmp_path / "train.jsonl", "seq-cls")
    an.fit(docs, batch_size=4)
    queries = [query_example(q, "seq-cls") for q in read_queries(tmp_path / "q.jsonl", "seq-cls")]
    _compare(wd, wd / "run", an, queries, docs)
    row = json.loads((wd / "run" / "results.jsonl").read_text().splitlines()[0])
    assert row["completion"] == " -> label 0" and row["top"][0]["text"] in _texts(12)
    assert invoke("report", wd / "run", "--quiet").exit_code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no label"}) + "\n")
    res = invoke("fit", "--model", tmp_path / "model", "--data", bad, "--workdir", tmp_path / "w2", "--task", "seq-cls")
    assert res.exit_code == 2 and "bad.jsonl, line 1: a classification example needs an integer 'label'" in res.stderr


def test_seq2seq_from_the_command_line(tmp_path: Path, tok) -> None:  # noqa: ANN001
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = _texts(10)
    rows = [{"source": t[: len(t) // 2], "target": t[len(t) // 2 :]} for t in texts]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    wd = tmp_path / "wd"
    fit = invoke(
        "fit",
        "--model",
        tmp_path / "model",
        "--data",
        tmp_path / "train.jsonl",
        "--workdir",
        wd,
        "--task",
        "seq2seq",
        "--batch-size",
        4,
        "--max-length",
        64,
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    res = invoke(
        "score", "--workdir", wd, "--queries", tmp_path / "q.jsonl", "--out", wd / "run", "--query-rank", 0, "--quiet"
    )
    assert res.exit_code == 0, res.output
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    an = hw.Attributor(model, task=hw.Seq2SeqTask(tok, max_length=64), modules="mlp")
    docs = read_documents(tmp_path / "train.jsonl", "seq2seq")
    an.fit(docs, batch_size=4)
    queries = [query_example(q, "seq2seq") for q in read_queries(tmp_path / "q.jsonl", "seq2seq")]
    _compare(wd, wd / "run", an, queries, docs)


def test_a_peft_adapter_directory_tracks_its_adapters(tmp_path: Path, tok) -> None:  # noqa: ANN001
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install headwater[peft])")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2))
    base.save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")  # the adapter records where its base model is
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: B != 0
    lora.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(8)))
    wd = tmp_path / "wd"
    fit = invoke(
        "fit",
        "--model",
        tmp_path / "adapter",
        "--data",
        tmp_path / "train.jsonl",
        "--workdir",
        wd,
        "--modules",
        "all",
        "--quiet",
    )
    assert fit.exit_code == 0, fit.output
    layers = json.loads((wd / "cli.json").read_text())["layers"]
    assert layers and all("lora_A" in n or "lora_B" in n for n in layers), layers


def test_score_with_the_unrolled_response_and_a_calibrated_damping(tmp_path: Path, tok) -> None:  # noqa: ANN001
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "model"
    )
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(8)))
    q = make_corpus(seed=3, small=True).queries[:2]
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": x["prompt"], "completion": x["completion"]}) + "\n" for x in q)
    )
    wd = tmp_path / "wd"
    assert (
        invoke(
            "fit", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--workdir", wd, "--quiet"
        ).exit_code
        == 0
    )
    base = ["score", "--workdir", wd, "--queries", tmp_path / "q.jsonl", "--query-rank", 0, "--quiet"]
    assert invoke(*base, "--out", wd / "influence").exit_code == 0
    res = invoke(*base, "--out", wd / "long", "--response", "unrolled", "--lr", 1, "--steps", 1e12)
    assert res.exit_code == 0, res.output
    a = load_tensors(wd / "influence" / "scores.safetensors")[0]["values"]
    b = load_tensors(wd / "long" / "scores.safetensors")[0]["values"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7 * a.abs().max().item())  # a long run: the influence
    res = invoke(*base, "--out", wd / "u", "--response", "unrolled", "--lr", 0.1)
    assert res.exit_code == 2 and "--response unrolled needs --lr and --steps" in res.stderr
    res = invoke(*base, "--out", wd / "c", "--damping", "calibrate")
    assert res.exit_code == 2 and 'damping="calibrate" needs a calibration in the workdir' in res.stderr
    cal = invoke("calibrate", "--workdir", wd, "--subsets", 3, "--steps", 2)
    assert cal.exit_code == 0, cal.output
    assert "calibrated damping scale" in cal.stderr and (wd / "calibration.json").exists()
    assert invoke(*base, "--out", wd / "c", "--damping", "calibrate").exit_code == 0
    # the chosen scale and its curve, in inspect and in the report of the run that used it
    saved = json.loads((wd / "calibration.json").read_text())["calibration"]
    scale = format(saved["scale"], "g")
    res = invoke("inspect", wd)
    assert res.exit_code == 0, res.output + res.stderr
    shown = res.stdout
    line = next((x for x in shown.splitlines() if x.startswith("damping   calibrated")), shown)
    assert f"calibrated {scale} x mean eigenvalue" in line and "STALE" not in line
    assert all(f"{format(c['scale'], 'g')}: " in line for c in saved["curve"])
    html = (wd / "c" / "report.html").read_text()
    assert f"calibrated on this model (headwater calibrate): {scale} x mean eigenvalue per layer" in html
    from headwater.storage import load_json, save_json

    other = load_json(wd / "calibration.json")
    other["factors"] = "0" * 32  # a calibration of other factors (copied in, checksummed) is marked stale
    save_json(wd / "calibration.json", {k: v for k, v in other.items() if k != "checksum"})
    assert "STALE: made for other factors" in invoke("inspect", wd).stdout
    fit = ["fit", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--workdir", wd, "--quiet"]
    assert invoke(*fit, "--overwrite", "--seed", 1).exit_code == 0
    assert not (wd / "calibration.json").exists()  # a refit removes it with the other derived results
    assert "damping   calibrated" not in invoke("inspect", wd).stdout


def test_source_from_a_training_record_and_calibrate(tmp_path: Path, tok) -> None:  # noqa: ANN001
    from transformers import GPT2Config, GPT2LMHeadModel

    from headwater.training import TrainingRecorder

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(8)))
    docs = read_documents(tmp_path / "train.jsonl")
    task = hw.LanguageModelingTask(tokenizer=tok, max_length=48)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = task.collate(list(docs))
    with TrainingRecorder(tmp_path / "record", model, opt, segments=2, total_steps=4, data=docs) as rec:
        for _ in range(4):
            opt.zero_grad()
            (task.loss(model, batch) / len(docs)).backward()
            opt.step()
    assert rec is not None
    tok.save_pretrained(tmp_path / "tok")
    q = make_corpus(seed=3, small=True).queries[:2]
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"prompt": x["prompt"], "completion": x["completion"]}) + "\n" for x in q)
    )
    res = invoke(
        "source",
        "--from-training",
        tmp_path / "record",
        "--data",
        tmp_path / "train.jsonl",
        "--queries",
        tmp_path / "q.jsonl",
        "--out",
        tmp_path / "run",
        "--tokenizer",
        tmp_path / "tok",
        "--top-k",
        3,
        "--max-length",
        48,
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["top"]) == 3
    rep = invoke("report", tmp_path / "run", "--quiet")
    assert rep.exit_code == 0, rep.stderr
    wrong = tmp_path / "other.jsonl"
    wrong.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(9)))
    res = invoke(
        "source",
        "--from-training",
        tmp_path / "record",
        "--data",
        wrong,
        "--queries",
        tmp_path / "q.jsonl",
        "--out",
        tmp_path / "run2",
        "--tokenizer",
        tmp_path / "tok",
        "--max-length",
        48,
    )
    assert res.exit_code == 2 and "is not what it trained on" in res.stderr
