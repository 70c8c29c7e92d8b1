"""The cost of verifying every artifact: checksums at write and read time, alone and as a share of fit and score.

    python benchmarks/checksum.py                 # a 1 GiB factors file, then the speed benchmark's model
    python benchmarks/checksum.py --gib 0.25      # smaller

Part 1 writes and reads a safetensors file of ``--gib`` GiB of float64 factors three ways: plain
``safetensors`` (no checksum), headwater's ``save_tensors``/``load_tensors`` (xxh3-128 of the
tensors while they are in memory), and the same with sha256, so the choice of hash is measured.
Part 2 fits and scores the speed benchmark's GPT-2 (4 layers, d=256, 128 tokens, 256 sequences)
with a workdir and reports the time spent inside ``headwater.storage.tensors_checksum`` and
``json_checksum`` as a share of each stage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import headwater.storage as storage


def _timed(fn):  # noqa: ANN001, ANN202
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def part1(gib: float, root: Path) -> None:
    n = int(gib * 2**30 / 8 / 8)
    tensors = {f"layer{i}::q_s": torch.randn(n, dtype=torch.float64) for i in range(8)}
    plain, ours = root / "plain.safetensors", root / "ours.safetensors"
    w_plain, _ = _timed(lambda: save_file(tensors, str(plain)))
    w_ours, _ = _timed(lambda: storage.save_tensors(ours, tensors))
    os.sync()
    # safetensors maps the file lazily: reading means touching every byte, as using the factors does
    r_plain, _ = _timed(lambda: [t.sum() for t in load_file(str(plain)).values()])
    r_ours, _ = _timed(lambda: [t.sum() for t in storage.load_tensors(ours)[0].values()])
    h_xx, _ = _timed(lambda: storage.tensors_checksum(tensors, "{}"))

    def sha() -> str:
        h = hashlib.sha256()
        for t in tensors.values():
            h.update(t.view(torch.uint8).numpy())
        return h.hexdigest()

    h_sha, _ = _timed(sha)
    size = plain.stat().st_size / 2**30
    print(f"\n## {size:.2f} GiB factors file (page cache warm; write includes fsync in headwater's atomic write)\n")
    print("| | plain safetensors | headwater (checksummed, atomic) | overhead |")
    print("|---|---|---|---|")
    print(f"| write | {w_plain:.2f} s | {w_ours:.2f} s | {w_ours - w_plain:+.2f} s |")
    print(f"| read and touch every value | {r_plain:.2f} s | {r_ours:.2f} s | {r_ours - r_plain:+.2f} s |")
    print(f"\nhash alone: xxh3-128 {h_xx:.2f} s, sha256 {h_sha:.2f} s ({h_sha / h_xx:.1f}x)")


def part2(root: Path) -> None:
    import headwater as hw

    sys_path = Path(__file__).parent
    import sys

    sys.path.insert(0, str(sys_path))
    from speed import build  # the speed benchmark's model and data

    args = argparse.Namespace(
        vocab=8000, tokens=128, d=256, layers=4, train=256, queries=16, device="cpu", dtype="fp32"
    )
    model, train, queries = build(args)
    spent = {"t": 0.0}
    for name in ("tensors_checksum", "json_checksum"):
        original = getattr(storage, name)

        def wrapped(*a, _f=original, **k):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent["t"] += time.perf_counter() - t

        setattr(storage, name, wrapped)
    an = hw.Attributor(model, modules="mlp", workdir=root / "wd", checkpoint_every=4)
    rows = []
    for stage, fn in (
        ("fit", lambda: an.fit(train, batch_size=16)),
        ("score", lambda: an.scores(queries, train, batch_size=16, query_rank=32)),
    ):
        spent["t"] = 0.0
        t, _ = _timed(fn)
        rows.append((stage, t, spent["t"]))
    print("\n## Share of a fit and a score (speed benchmark's GPT-2, workdir with checkpoints every 4 batches)\n")
    print("| stage | wall (s) | in checksums (s) | share |")
    print("|---|---|---|---|")
    for stage, t, c in rows:
        print(f"| {stage} | {t:.2f} | {c:.3f} | {c / t:.2%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=".") as d:
        part1(args.gib, Path(d))
        part2(Path(d))


if __name__ == "__main__":
    main()
