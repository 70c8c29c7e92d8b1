"""The projected-gradient index: quality against exact EK-FAC, build cost, query latency, disk.

    python benchmarks/index_bench.py quality      # GPT-2 arch, 2 layers, d=128, trained briefly;
                                                  # Spearman / top-10 / top-100 vs exact EK-FAC
    python benchmarks/index_bench.py throughput   # speed.py's CPU config: build time / fwd+bwd
    python benchmarks/index_bench.py latency      # 100k synthetic records at the default size
    python benchmarks/index_bench.py all

Quality: exact = ``Attributor(strategy="ekfac").scores`` (full-rank query gradients) on the
same model and data; the index is built with the same attributor (so the same modules, task,
sampled-label seeds). Per query we compute the Spearman correlation of all N scores and the
overlap of the top-10 / top-100 sets, then average over queries.

Throughput: "plain forward+backward" is speed.py's baseline (forward, summed cross-entropy,
``loss.backward()`` into ``.grad``). The record pass is ``build_index(curvature="identity")``,
i.e. one captured pass + projection + shard writes; the full default build adds the projected
dense Gauss-Newton pass (sampled labels), which is a second pass over the data.

Latency: building 100k real records on a CPU would take hours, so the 100k-record index is
synthesized: projections and curvature come from a real build on a few sequences of the same
model, and the shards are random float16 records written in the index format (with checksums).
Scan cost does not depend on the values. "Query batch" = 16 queries; the end-to-end time also
includes their gradients through the model.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import headwater as hw
import headwater.index as hwi
from headwater.index import DEFAULT_DIM, DEFAULT_SHARD_SIZE, GradientIndex, build_index, query_index
from headwater.storage import atomic_write_bytes, load_json, save_json

# ---------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------


def gpt2(layers: int, d: int, vocab: int, tokens: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=max(tokens, 128),
        n_embd=d,
        n_layer=layers,
        n_head=max(1, d // 64),
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def markov_data(n: int, tokens: int, vocab: int, seed: int, branching: int = 4) -> list[dict]:
    """Sequences from a fixed sparse Markov chain (each token has ``branching`` likely successors,
    10% uniform noise), so a briefly trained model has real structure to attribute."""
    chain = torch.randint(0, vocab, (vocab, branching), generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, tokens, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, tokens):
        nxt = chain[x[:, t - 1], torch.randint(0, branching, (n,), generator=g)]
        noise = torch.rand(n, generator=g) < 0.1
        x[:, t] = torch.where(noise, torch.randint(0, vocab, (n,), generator=g), nxt)
    return [{"input_ids": row} for row in x]


def queries_from(data: list[dict]) -> list[dict]:
    """Prompt = first half, completion (scored) = second half."""
    out = []
    for item in data:
        ids = item["input_ids"]
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_briefly(model, data: list[dict], steps: int, batch_size: int = 16, lr: float = 3e-3) -> float:
    if steps == 0:
        return float("nan")
    task = hw.LanguageModelingTask()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g).tolist()
        batch = task.collate([data[i] for i in idx])
        loss = task.loss(model, batch) / batch["input_ids"].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def plain_forward_backward(model, data: list[dict], batch_size: int) -> None:
    task = hw.LanguageModelingTask()
    for lo in range(0, len(data), batch_size):
        batch = task.collate(data[lo : lo + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def header(args) -> None:
    print(
        f"# {platform.machine()} {platform.processor()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# {' '.join(sys.argv)}")
    shown = {k: v for k, v in vars(args).items() if k != "configs" or args.what == "quality"}
    print(f"# config: {shown}")


def disk_per_token(index: GradientIndex, data: list[dict]) -> float:
    total = sum(e["bytes"] for e in index.shards)
    return total / sum(len(x["input_ids"]) for x in data)


# ---------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------


def compare(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """Mean over queries of Spearman rho, top-10 overlap and top-100 overlap."""
    from scipy.stats import spearmanr

    rho, top10, top100 = [], [], []
    for a, e in zip(approx.double(), exact.double()):
        rho.append(spearmanr(a.numpy(), e.numpy()).statistic)
        for k, acc in ((10, top10), (100, top100)):
            k = min(k, len(a))
            acc.append(len(set(a.topk(k).indices.tolist()) & set(e.topk(k).indices.tolist())) / k)
    return statistics.mean(rho), statistics.mean(top10), statistics.mean(top100)


def quality(args) -> None:
    model = gpt2(args.layers, args.d, args.vocab, args.tokens)
    train = markov_data(args.train, args.tokens, args.vocab, seed=1)
    queries = queries_from(markov_data(args.queries, args.tokens, args.vocab, seed=2))
    final_loss = train_briefly(model, train, args.train_steps)
    uniform = math.log(args.vocab)
    print(f"# trained {args.train_steps} steps, final per-token loss {final_loss:.3f} (uniform: {uniform:.3f})")
    an = hw.Attributor(model, modules="mlp", strategy="ekfac")
    t_fit, _ = timed(lambda: an.fit(train, batch_size=args.batch_size))
    t_exact, exact = timed(lambda: an.scores(queries, train, batch_size=args.batch_size).values)
    print(
        f"# exact EK-FAC: fit {t_fit:.1f} s, scores {t_exact:.1f} s; tracked layers "
        f"{[(n, ad.out_features, ad.in_features) for n, ad in an.layers.items()]}"
    )
    configs = [(c.split(":")[0], int(c.split(":")[1]), c.split(":")[2]) for c in args.configs.split(",")]
    cols = [
        "projection",
        "dim (k_out = k_in)",
        "floats / record",
        "curvature",
        "Spearman",
        "top-10",
        "top-100",
        "build (s)",
        "bytes / token",
    ]
    print("\n| " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for proj, dim, curv in configs:
            path = Path(tmp) / f"{proj}-{dim}-{curv}"
            t_build, idx = timed(
                build_index, an, train, dim=dim, batch_size=args.batch_size, path=path, projection=proj, curvature=curv
            )
            res = query_index(an, queries, idx, batch_size=args.batch_size)
            rho, t10, t100 = compare(res.values, exact)
            kind = idx.manifest["curvature"]["kind"]
            cells = [
                proj,
                dim,
                idx.record_dim,
                kind,
                f"{rho:.3f}",
                f"{t10:.2f}",
                f"{t100:.2f}",
                f"{t_build:.1f}",
                f"{disk_per_token(idx, train):.1f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------
# Build throughput
# ---------------------------------------------------------------------------------------


def throughput(args) -> None:
    model = gpt2(args.layers, args.d, args.vocab, args.tokens)
    train = markov_data(args.train, args.tokens, args.vocab, seed=1)
    n_tok = args.train * args.tokens
    plain_forward_backward(model, train[: args.batch_size], args.batch_size)  # warm-up
    base = min(timed(plain_forward_backward, model, train, args.batch_size)[0] for _ in range(args.repeats))
    unfitted = hw.Attributor(model, modules="mlp", strategy="identity")
    fitted = hw.Attributor(model, modules="mlp", strategy="ekfac")
    t_fit, _ = timed(fitted.fit, train, batch_size=args.batch_size)
    quarter = train[: len(train) // 4]
    builds = [
        ("records only", unfitted, {"curvature": "identity"}),
        ("default, fitted EK-FAC attributor", fitted, {}),
        ("default, unfitted attributor", unfitted, {}),
        ("projected EK-FAC fitted on 1/4 of the data", unfitted, {"curvature": "ekfac", "curvature_data": quarter}),
    ]
    best: dict[int, float] = {}
    kinds: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # repeats interleaved, and the baseline re-timed in each round: on a shared machine the
        # load changes within minutes, and the best of each spreads that evenly
        for rep in range(args.repeats):
            base = min(base, timed(plain_forward_backward, model, train, args.batch_size)[0])
            for k, (_, an, kw) in enumerate(builds):
                t, idx = timed(
                    build_index,
                    an,
                    train,
                    dim=args.dim,
                    batch_size=args.batch_size,
                    path=Path(tmp) / f"{k}-{rep}",
                    **kw,
                )
                best[k], kinds[k] = min(best.get(k, math.inf), t), idx.manifest["curvature"]["kind"]
                disk = disk_per_token(idx, train)
    print(
        f"\nplain forward+backward: {base:.2f} s ({n_tok / base:,.0f} tokens/s); "
        f"engine EK-FAC fit (not part of any build below): {t_fit:.2f} s = {t_fit / base:.2f}x\n"
    )
    print("| build | curvature | time (s, best of repeats) | ratio to fwd+bwd | tokens/s | bytes / token |")
    print("|---|---|---|---|---|---|")
    for k, (label, _, _) in enumerate(builds):
        cells = [label, kinds[k], f"{best[k]:.2f}", f"{best[k] / base:.2f}x", f"{n_tok / best[k]:,.0f}", f"{disk:.1f}"]
        print("| " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------
# Query latency on a synthetic 100k-record index
# ---------------------------------------------------------------------------------------


def synthesize(real: GradientIndex, path: Path, n: int, shard_size: int) -> GradientIndex:
    """An index of ``n`` random float16 records with ``real``'s layout, projections and curvature."""
    path.mkdir(parents=True)
    for side in (real.manifest["projection"], real.manifest["curvature"]):
        shutil.copy(real.path / side["file"], path / side["file"])
    manifest = load_json(real.path / "manifest.json")
    rng = np.random.default_rng(0)
    shards = []
    for j, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        records = rng.standard_normal((stop - start, real.record_dim), dtype=np.float32).astype("<f2")
        data = records.tobytes()
        name = f"shard-{j:05d}.bin"
        atomic_write_bytes(path / name, data)
        shards.append(
            {"file": name, "start": start, "stop": stop, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    manifest.update(
        n_records=n,
        n_shards=len(shards),
        shards=shards,
        shard_size=shard_size,
        data_fingerprint="synthetic",
        curvature_data_fingerprint="synthetic",
    )
    save_json(path / "manifest.json", manifest)
    return GradientIndex.open(path, verify=True)


def latency(args) -> None:
    model = gpt2(args.layers, args.d, args.vocab, args.tokens)
    an = hw.Attributor(model, modules="mlp", strategy="identity")
    small = markov_data(32, args.tokens, args.vocab, seed=1)
    queries = queries_from(markov_data(64, args.tokens // 4 * 2, args.vocab, seed=2))
    with tempfile.TemporaryDirectory() as tmp:
        real = build_index(an, small, dim=args.dim, batch_size=16, path=Path(tmp) / "real")
        t_syn, idx = timed(lambda: synthesize(real, Path(tmp) / "big", args.records, args.shard_size))
        size = sum(e["bytes"] for e in idx.shards)
        print(
            f"\n# synthetic index: {idx.n_records:,} records x {idx.record_dim} float16 = {size / 2**20:,.0f} MiB "
            f"in {len(idx.shards)} shards (written + checksummed in {t_syn:.1f} s)"
        )
        print("\n| threads | queries | scan only (ms, median) | end-to-end query_index (ms, median) |")
        print("|---|---|---|---|")
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            for n_q in (1, 16, 64):
                qs = queries[:n_q]
                q = torch.randn(n_q, idx.record_dim)
                idx.scan(q)  # warm the page cache
                scan = statistics.median(timed(idx.scan, q)[0] for _ in range(args.repeats))
                query_index(an, qs, idx, batch_size=16)
                e2e = statistics.median(timed(query_index, an, qs, idx, batch_size=16)[0] for _ in range(args.repeats))
                print(f"| {threads} | {n_q} | {scan * 1e3:.0f} | {e2e * 1e3:.0f} |", flush=True)
        torch.set_num_threads(default_threads)
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("\n# faiss not installed: FAISS search not timed")
            return
        from headwater.index import _faiss_scores, _faiss_spec

        q = torch.randn(16, idx.record_dim)
        t_build, _ = timed(_faiss_scores, idx, q, 10)  # builds and saves the FAISS index once
        t = statistics.median(timed(_faiss_scores, idx, q, 10)[0] for _ in range(args.repeats))
        exact = idx.scan(q)[0].topk(10).indices
        found = _faiss_scores(idx, q, 10).topk(10).indices
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, found)) / exact.numel()
        print(
            f"\n# FAISS {_faiss_spec(idx.n_records)} (nprobe {hwi.FAISS_NPROBE}), 16 queries, top-10: search "
            f"{t * 1e3:.0f} ms (median, after a one-off {t_build:.0f} s build); top-10 recall vs the exact scan "
            f"{recall:.2f} (random synthetic records do not cluster, so this is a worst case)"
        )


QUALITY_CONFIGS = ",".join(
    [f"gaussian:{d}:{c}" for d in (8, 16, 32, 64) for c in ("engine", "ekfac", "dense")]
    + [
        "gaussian:16:identity",
        "orthogonal:16:engine",
        "rademacher:16:engine",
        "kfac:16:engine",
        "kfac:32:engine",
        "kfac:64:engine",
        "orthogonal:64:ekfac",
    ]
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "throughput", "latency", "all"])
    p.add_argument("--layers", type=int, default=None, help="default: 2 for quality, 4 otherwise (speed.py)")
    p.add_argument("--d", type=int, default=None, help="default: 128 for quality, 256 otherwise")
    p.add_argument("--tokens", type=int, default=None, help="default: 64 for quality, 128 otherwise")
    p.add_argument("--vocab", type=int, default=None, help="default: 2000 for quality, 8000 otherwise")
    p.add_argument("--train", type=int, default=None, help="default: 1000 for quality, 256 for throughput")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--configs", default=QUALITY_CONFIGS, help="projection:dim:curvature,... for quality")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    quality_cfg = dict(layers=2, d=128, tokens=64, vocab=2000, train=1000)
    speed_cfg = dict(layers=4, d=256, tokens=128, vocab=8000, train=256)
    for what in ("quality", "throughput", "latency") if args.what == "all" else (args.what,):
        run = argparse.Namespace(**vars(args))
        for k, v in (quality_cfg if what == "quality" else speed_cfg).items():
            if getattr(run, k) is None:
                setattr(run, k, v)
        print(f"\n## {what}")
        header(run)
        {"quality": quality, "throughput": throughput, "latency": latency}[what](run)


if __name__ == "__main__":
    main()
