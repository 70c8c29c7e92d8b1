"""Scale-out: fit and score time on 1 process vs W gloo processes, same model and data.

    python benchmarks/distributed.py                 # speed.py's CPU config, W = 2
    python benchmarks/distributed.py --world 2 --train 128

Processes are spawned with the environment variables torchrun sets and use gloo; each
process gets ``threads // world`` intra-op threads so the comparison uses the same cores.
It also prints the communication volume per layer (the all-reduced factor sums and the
broadcast eigenvectors), which is what multi-GPU runs pay on top of the per-rank work.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import speed  # noqa: E402

import headwater as hw  # noqa: E402


def _job(args, out: Path | None) -> dict:
    model, train, queries = speed.build(args)
    an = hw.Attributor(model, modules="mlp", strategy="ekfac")
    t = time.perf_counter()
    an.fit(train, batch_size=args.batch_size)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    res = an.scores(queries, train, batch_size=args.batch_size, query_rank=args.rank)
    score = time.perf_counter() - t
    volume = {
        n: {
            "allreduce_bytes": 8 * (ad.in_features**2 + ad.out_features**2 + ad.out_features * ad.in_features),
            "broadcast_bytes": 8 * (ad.in_features**2 + ad.out_features**2 + ad.in_features + ad.out_features),
        }
        for n, ad in an.layers.items()
    }
    result = {"fit": fit, "score": score, "checksum": float(res.values.double().abs().sum()), "volume": volume}
    if out is not None:
        out.write_text(json.dumps(result))
    return result


def _worker(rank: int, world: int, port: int, args, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo")
    try:
        _job(args, Path(tmp) / f"rank{rank}.json" if rank == 0 else None)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    speed.add_config_args(p)
    args = p.parse_args(argv)
    args.device, args.dtype = "cpu", "fp32"

    torch.set_num_threads(args.threads)
    single = _job(args, None)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(_worker, args=(args.world, port, args, tmp), nprocs=args.world, start_method="spawn")
        multi = json.loads((Path(tmp) / "rank0.json").read_text())

    print(f"# config: {vars(args)}")
    print(f"| phase | 1 process (s) | {args.world} processes (s) | speedup |")
    print("|---|---|---|---|")
    for phase in ("fit", "score"):
        print(f"| {phase} | {single[phase]:.1f} | {multi[phase]:.1f} | {single[phase] / multi[phase]:.2f}x |")
    rel = abs(single["checksum"] - multi["checksum"]) / single["checksum"]
    print(
        f"\nsum |scores|: 1 process {single['checksum']:.6e}, {args.world} processes {multi['checksum']:.6e} "
        f"(relative difference {rel:.1e})"
    )
    total = sum(v["allreduce_bytes"] + v["broadcast_bytes"] for v in single["volume"].values())
    print("\n| layer | all-reduce per fit pass (MB) | eigenvector broadcast (MB) |\n|---|---|---|")
    for n, v in single["volume"].items():
        print(f"| {n} | {v['allreduce_bytes'] / 2**20:.2f} | {v['broadcast_bytes'] / 2**20:.2f} |")
    print(f"\ntotal communication per fit: {total / 2**20:.1f} MB (independent of the number of training tokens)")


if __name__ == "__main__":
    main()
