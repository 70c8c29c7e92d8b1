"""A million documents: scoring streams the corpus from disk with memory flat in N and time linear in N.

    python benchmarks/million.py                       # 10k, 100k and 1M documents of 16 tokens
    python benchmarks/million.py --sizes 10000,100000  # a quicker check

The corpus is written once as a ``datasets`` ``save_to_disk`` directory (Arrow, memory-mapped:
``headwater.io.read_documents`` reads it lazily, row by row) of random 16-token documents. Each
size runs in its own process: a tiny GPT-2 (2 layers, d=64, vocabulary 512) fitted on a seeded
sample of 2,000 documents (``fit(max_examples=...)``), then ``Attributor.rank`` keeps each of 8
queries' top-10 and bottom-10 over all N documents. Reported: wall time of the ranking pass,
documents per second, and the child's peak RSS: its own ``VmHWM`` (Linux), not ``os.wait4``'s
``ru_maxrss``, which a child inherits from the parent's high-water mark at fork (here the parent
has just built the 1M-row corpus, so wait4 reported 1,559 MB for a child that peaked at ~1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel
import headwater as hw
from headwater.io import read_documents
path, k = sys.argv[1], 10
docs = read_documents(path)                       # lazy: a memory-mapped Arrow table
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval()
g = torch.Generator().manual_seed(1)
queries = []
for _ in range(8):
    ids = torch.randint(0, 512, (12,), generator=g)
    labels = ids.clone(); labels[:6] = -100
    queries.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
an = hw.Attributor(model, modules="mlp").fit(docs, batch_size=256, max_examples=2000)
t = time.perf_counter()
rk = an.rank(queries, docs, k=k, batch_size=512)
seconds = time.perf_counter() - t
hwm = None
try:
    hwm = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except OSError:
    pass
print(json.dumps({"n": len(docs), "seconds": seconds, "top": rk.top.indices[0, :3].tolist(), "hwm_mb": hwm}))
"""


def corpus(n: int, root: Path) -> Path:
    """``n`` random 16-token documents as a save_to_disk directory (written once per size)."""
    import datasets
    import numpy as np

    path = root / f"docs-{n}"
    if not (path / "dataset_info.json").exists():
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 512, size=(n, 16), dtype=np.int64)
        datasets.Dataset.from_dict({"input_ids": list(ids)}).save_to_disk(str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--root", type=Path, default=Path("runs/million"))
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one torch thread per process")
    print("\n| documents | ranking pass (s) | documents / s | peak RSS (MB) |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        path = corpus(n, args.root)
        with open(args.root / "out.txt", "w+") as fo, open(args.root / "err.txt", "w+") as fe:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=fo, stderr=fe, text=True)
            _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: only where VmHWM is missing
            fo.seek(0), fe.seek(0)
            out, err = fo.read(), fe.read()
        if status != 0:
            raise RuntimeError(err[-2000:])
        res = json.loads(out.strip().splitlines()[-1])
        rss = res["hwm_mb"] if res.get("hwm_mb") is not None else usage.ru_maxrss / 1024
        print(f"| {res['n']:,} | {res['seconds']:.1f} | {res['n'] / res['seconds']:,.0f} | {rss:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
