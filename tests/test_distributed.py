"""Two gloo processes on CPU give the single-process factors and scores (plain, DDP, FSDP2).

Processes are started with torch.multiprocessing and the same environment variables torchrun
sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), then ``init_process_group("gloo")``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import headwater as hw
from headwater.storage import load_tensors, save_tensors

sys.path.insert(0, str(Path(__file__).parent))
from _models import lm_data, lm_queries, tiny_gpt2  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fully_shard(model):
    """FSDP2: each transformer block and the root shard their parameters over the two ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _results(model, workdir, out: Path | None, wrap: str | None = None) -> dict[str, torch.Tensor]:
    train, queries = lm_data(13), lm_queries(3)  # 7 batches of 2: the ranks get 4 and 3
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp":
        model = _fully_shard(model)
    an = hw.Attributor(model, modules="mlp", workdir=workdir, checkpoint_every=1).fit(train, batch_size=2)
    res = an.scores(queries, train, batch_size=2, per_layer=True, per_token=True)
    tensors = {f"lam::{n.removeprefix('module.')}": op.lam for n, op in an.curvature.items()}
    tensors.update({f"q_a::{n.removeprefix('module.')}": op.q_a.abs() for n, op in an.curvature.items()})
    tensors.update({k.replace("module.", ""): v for k, v in res.tensors().items()})
    tensors["self"] = an.self_influence(train, batch_size=3)
    if wrap == "fsdp":
        try:
            an.scores(queries, train, batch_size=2, refine_steps=1)
            raise AssertionError("refine_steps on a sharded model should be refused")
        except ValueError as e:
            assert "sharded (FSDP)" in str(e)
    if out is not None:
        save_tensors(out, tensors)
    return tensors


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        out = Path(tmp) / f"rank{rank}.safetensors"
        _results(tiny_gpt2(), Path(tmp) / "work", out)
        _results(tiny_gpt2(), None, Path(tmp) / f"ddp{rank}.safetensors", wrap="ddp")
        _results(tiny_gpt2(), Path(tmp) / "fsdp", Path(tmp) / f"fsdp{rank}.safetensors", wrap="fsdp")
        dist.barrier()  # gloo aborts if one rank tears down while the other still talks
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    expected = _results(tiny_gpt2(), None, None)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for name in ("rank0", "rank1", "ddp0", "ddp1", "fsdp0", "fsdp1"):
        got, _ = load_tensors(tmp_path / f"{name}.safetensors")
        assert got.keys() == expected.keys(), name
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], msg=f"{name}: {k}")
    # both ranks wrote into one workdir: one config, one set of factors, one assembled score file
    work = tmp_path / "work"
    assert (work / "factors.safetensors").exists()
    assert len(list((work / "scores").glob("*.safetensors"))) == 1
    assert not list((work / "partial").glob("*.safetensors"))
