"""Fitting on a sample: how close ``fit(max_examples=N)`` comes to the fit on all the data.

    python benchmarks/sample_fit.py                  # the demo's corpus and model, N = all, 1/2 ... 1/16
    python benchmarks/sample_fit.py --seeds 3        # the spread over sample seeds

The demo's corpus (facts about fictional people, paraphrased, with distractors) and its trained
GPT-2 are built in-process (no network), then EK-FAC is fitted on all documents and on seeded
random samples of N of them (``Attributor(seed=s).fit(train, max_examples=N)``, the sample the
CLI's ``--fit-examples N`` takes). Every fit scores the demo's queries against the whole corpus.
Reported per N: fit time, the Pearson and Spearman correlation of the flattened [Q, N] score
matrix with the full fit's, the mean top-10 overlap per query, and the demo's recall@10 (the
share of each query's fact documents in its top 10), mean and spread over the sample seeds. The
row "all, other seeds" refits on every document with other seeds: the pseudo-label sampling's
own spread, the floor the samples are measured against.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import headwater as hw
from headwater.evaluate import retrieval
from headwater.synthetic import make_corpus, train_model, train_tokenizer


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return statistics.fmean(len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="1,2,4,8,16", help="N = all / f for each f")
    p.add_argument("--seeds", type=int, default=3, help="sample seeds per N (the full fit needs one)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    corpus = make_corpus(0)
    tok = train_tokenizer(corpus.docs, vocab_size=corpus.config.vocab_size)
    model = train_model(corpus.docs, tok, seed=0)
    task = hw.LanguageModelingTask(tokenizer=tok)
    train = [{"text": d} for d in corpus.docs]
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in corpus.queries]
    relevant = [corpus.relevant(q["fact"]) for q in corpus.queries]

    def recall(values: torch.Tensor) -> float:
        return retrieval(values, relevant, ks=(10,)).recall[10]

    n = len(train)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# {n} documents, {len(queries)} queries, EK-FAC on the MLP layers, batch {args.batch_size}\n")

    def run(max_examples: int | None, seed: int) -> tuple[float, torch.Tensor]:
        an = hw.Attributor(model, task=task, modules="mlp", seed=seed)
        t = time.perf_counter()
        an.fit(train, batch_size=args.batch_size, max_examples=max_examples)
        seconds = time.perf_counter() - t
        return seconds, an.scores(queries, train, batch_size=args.batch_size).values.double()

    t_full, full = run(None, 0)
    print("| fitted on | fit (s) | Pearson | Spearman | top-10 overlap | recall@10 |")
    print("|---|---|---|---|---|---|")
    print(f"| all {n} | {t_full:.1f} | 1 | 1 | 1 | {recall(full):.3f} |", flush=True)
    for f in (int(x) for x in args.fractions.split(",")):
        m = n // f
        # f = 1: all documents again with other seeds, the Fisher's own pseudo-label noise floor
        rows = [run(m, s) for s in range(1, args.seeds + 1)] if f == 1 else [run(m, s) for s in range(args.seeds)]
        pear = [float(torch.corrcoef(torch.stack([full.flatten(), v.flatten()]))[0, 1]) for _, v in rows]
        spear = [spearman(full.flatten(), v.flatten()) for _, v in rows]
        over = [overlap(full, v) for _, v in rows]
        rec = [recall(v) for _, v in rows]

        def cell(xs: list[float], spec: str = ".3f") -> str:
            return f"{statistics.fmean(xs):{spec}}" + (f" ± {statistics.stdev(xs):{spec}}" if len(xs) > 1 else "")

        secs = statistics.fmean(t for t, _ in rows)
        label = "all, other seeds" if f == 1 else f"1/{f}"
        print(
            f"| {m} ({label}) | {secs:.1f} | {cell(pear)} | {cell(spear)} | {cell(over, '.2f')} | {cell(rec)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
