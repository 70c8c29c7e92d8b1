"""The built-in demo: a corpus with known answers, a tiny GPT-2 trained on it, and EK-FAC.

    headwater demo --out headwater-demo          # full size, about a minute on 2 CPU cores
    HEADWATER_DEMO_SMALL=1 headwater demo        # reduced size, for tests

The corpus is about fictional people. Each person has three facts (birthplace, profession,
dog's name), and each fact is stated in four paraphrases, one document each, some with an
unrelated sentence before or after it. Distractors are documents that mention a person
without stating a queried fact, documents that describe a birthplace without saying who was
born there (they contain the answer word, so they are hard negatives), and filler text.
Every fact's value is unique to it, so the ground truth is exact: the documents that state
fact f are the ones that could have taught the model the answer to query f.

A query is the first paraphrase's prompt ("Quibu Kamar was born in") with the value as the
completion; a good attribution puts that fact's four documents in the top 10 of ~380.

Nothing here touches the network: the tokenizer is a byte-level BPE trained with
``tokenizers`` on the corpus, and the model is a ``transformers`` GPT-2 trained from scratch.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .synthetic import (
    FULL,
    SMALL,
    Corpus,
    DemoConfig,
    demo_is_small,
    make_corpus,
    query_accuracy,
    train_model,
    train_tokenizer,
)

__all__ = ["run_demo", "demo_is_small", "DemoConfig", "Corpus", "make_corpus", "train_tokenizer", "train_model"]

FILES = (  # what a demo run writes into its directory (and clears before a new run)
    "train.jsonl", "queries.jsonl", "demo.json", "cli.json", "config.json", "covariance.safetensors",
    "factors.safetensors", "scores.safetensors", "results.jsonl", "report.html", "run.json",
)  # fmt: skip


def _clear(out: Path) -> None:
    """Remove a previous demo's artifacts, so its workdir cannot clash with the new model.

    Only a directory that is empty or holds a previous demo (demo.json) is cleared, and only
    of the files a demo writes: pointing --out at a directory of one's own is an error.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the demo")
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.json").exists() and not (out / "model").is_dir():
        raise ValueError(f"--out {out} is not empty and holds no previous demo; pass a new or empty directory")
    for name in FILES:
        (out / name).unlink(missing_ok=True)
    for name in ("model", "scores", "partial", "checkpoints", "results", "index"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _save_pretrained(model: Any, tok: Any, target: Path) -> None:
    """save_pretrained into a temporary directory, then rename: never a half-written model."""
    tmp = target.with_name(f".{target.name}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, target)


def run_demo(out_dir: str | Path = "headwater-demo", small: bool = False, quiet: bool = False, seed: int = 0) -> dict:
    """Corpus -> tokenizer -> model -> EK-FAC fit -> scores -> terminal summary and report.

    Returns the summary also written to ``out_dir/demo.json`` (recall@10, timings, sizes).
    """
    import torch
    from transformers.utils import logging as hf_logging

    cfg = SMALL if small else FULL
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # "Loading weights" bars for a 1 MB model are noise
    try:
        return _run_demo(Path(out_dir), cfg, small, quiet, seed)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run_demo(out: Path, cfg: DemoConfig, small: bool, quiet: bool, seed: int) -> dict:
    """The demo, start to finish. Long because it is the tutorial a new user reads: corpus,
    tokenizer, model, fit, score, check and report, in the order they run."""
    import torch

    from .storage import atomic_write_text, save_json
    from .workflow import fit_workdir, score_workdir

    say = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = make_corpus(seed, small)
    say(f"corpus: {len(corpus.docs)} documents, {len(corpus.facts)} facts x {cfg.n_paraphrases} paraphrases")
    tok = train_tokenizer(corpus.docs, vocab_size=cfg.vocab_size)
    model = train_model(corpus.docs, tok, seed=seed, small=small, progress=not quiet)
    t_train = time.perf_counter() - t0
    accuracy = query_accuracy(model, tok, corpus.queries)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"model: GPT-2, {cfg.n_layer} layers x {cfg.n_embd} wide, {n_params / 1e6:.2f}M parameters, "
        f"trained in {t_train:.0f}s; answers {accuracy:.0%} of the queries"
    )

    _save_pretrained(model, tok, out / "model")
    atomic_write_text(
        out / "train.jsonl",
        "".join(_jsonl({"text": d, "fact": f}) for d, f in zip(corpus.docs, corpus.doc_facts)),
    )
    queries = [dict(q, relevant=corpus.relevant(q["fact"])) for q in corpus.queries]
    atomic_write_text(out / "queries.jsonl", "".join(_jsonl(q) for q in queries))

    t1 = time.perf_counter()
    fit_workdir(
        out / "model", out / "train.jsonl", out, modules="mlp", strategy="ekfac",
        batch_size=32, progress=not quiet, log=say,
    )  # fmt: skip
    t_fit = time.perf_counter() - t1
    t2 = time.perf_counter()
    results = score_workdir(
        out,
        out / "queries.jsonl",
        out=out,
        top_k=10,
        query_rank=None,
        batch_size=32,
        progress=not quiet,
        log=say,
        title="headwater demo",
    )["results"]
    t_score = time.perf_counter() - t2

    recalls = [r["recall"] for r in results]
    recall = sum(recalls) / len(recalls)
    _print_top3(results, corpus, print)
    full = sum(r == 1.0 for r in recalls)
    print(
        f"recall@10 = {recall:.3f} (mean over {len(recalls)} queries of the share of the fact's "
        f"{cfg.n_paraphrases} documents in the top 10; {full}/{len(recalls)} queries have all of them)"
    )
    summary = {
        "recall@10": recall,
        "recall@10_per_query": recalls,
        "queries_with_full_recall": full,
        "query_accuracy": accuracy,
        "n_docs": len(corpus.docs),
        "n_facts": len(corpus.facts),
        "n_queries": len(corpus.queries),
        "n_params": n_params,
        "small": small,
        "seed": seed,
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
        "seconds": {
            "train": round(t_train, 2),
            "fit": round(t_fit, 2),
            "score": round(t_score, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "report": str(out / "report.html"),
    }
    save_json(out / "demo.json", summary)
    print(f"report: {out / 'report.html'}  ({summary['seconds']['total']:.0f}s in all)")
    return summary


def _jsonl(obj: dict) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False) + "\n"


def _print_top3(results: list[dict], corpus: Corpus, out: Any) -> None:
    out("top 3 training documents per query (* = states the query's fact):")
    for r in results:
        fact = corpus.facts[r["fact"]] if r.get("fact") is not None else None
        head = f"{r['prompt']} ->{r['completion']}"
        got = sum(1 for j in r["relevant"] if j in {t["index"] for t in r["top"][:10]})
        out(f"  {head}    [{got}/{len(r['relevant'])} in top 10]")
        for rank, t in enumerate(r["top"][:3], start=1):
            mark = "*" if fact is not None and corpus.doc_facts[t["index"]] == fact.id else " "
            text = t["text"] if len(t["text"]) <= 90 else t["text"][:87] + "..."
            out(f"    {rank}. {mark} {t['score']:+.3g}  #{t['index']:<4d} {text}")
