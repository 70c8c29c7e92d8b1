"""The one pass loop: the only place where a batch becomes per-layer captures.

Every phase of headwater is a *consumer* of this loop (curvature accumulators, query
gradients, scores, self-influence, index records, projected curvature)::

    run_pass(model, task, layers, data, consumer, losses=..., batch_size=8, phase="covariance")

For each batch (in dataset order, batch b on rank ``b % world``): collate, move to the model's
device, seed torch's RNG from ``(seed, phase, first example)`` so that pseudo-labels do not
depend on the rank or on resumption, run the task's pseudo-losses (one forward, k backward
passes), and hand each tracked layer's ``LayerCapture`` to ``consumer.update`` from inside the
backward, as soon as that layer's gradient exists (``Capture.stream``: one layer's capture alive at
a time, in backward order; ``finish_batch`` follows once all are in). Distributed
sharding, FSDP filler batches and checkpoints live here, once.

Checkpoints: with a ``Checkpoint``, every ``every`` finished batches the loop saves what the
consumer returns from ``checkpoint()`` under a directory named by ``key`` (a hash of everything
the pass's result depends on, so a pass with other inputs never reads it). A consumer that
*accumulates* (sums) returns its whole state, which replaces the rank's file; one that *appends*
(finished score blocks) returns what is new, which goes to a new file. A rerun restores every
file and skips the batches they cover, and per-batch seeds make the result identical to an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter
from ..data import iter_batches
from ..distributed import all_reduce_max, barrier, is_main, rank_world
from ..errors import ExampleError
from ..storage import load_tensors, save_tensors
from ..task import Task, TokenMasks
from .capture import Capture, LayerCapture

__all__ = ["Consumer", "Checkpoint", "run_pass", "derive_seed", "model_device", "is_sharded", "spec_key", "eval_mode"]

Losses = Callable[[Any], list[torch.Tensor]]


class Consumer:
    """What a pass feeds: override ``update``; the rest are optional hooks.

    ``update(c, start, first)``: one tracked layer's capture for the batch whose first example
    is ``start``; ``first`` is False for the 2nd..k-th pseudo-loss of the same forward pass.
    ``appends``: True when ``checkpoint()`` returns only what is new since the last call.
    """

    appends = False

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        raise NotImplementedError

    def finish_batch(self, start: int) -> None:
        """All layers of the batch at ``start`` are in (e.g. move its results to the CPU)."""

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """Tensors to save now so that ``restore`` can rebuild what the finished batches gave."""
        return {}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``checkpoint`` saved."""

    def finish_pass(self) -> None:
        """Every local batch is consumed (e.g. sum the partial results across ranks)."""


@dataclass
class Checkpoint:
    """Where and how often a pass saves its progress: ``directory / key``, every ``every`` batches per rank."""

    directory: Path
    key: str
    every: int

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.key

    def clear(self) -> None:
        """Remove the pass's files once its result is safely elsewhere (call on every rank)."""
        barrier()  # no rank may still be writing or reading
        if is_main():
            shutil.rmtree(self.path, ignore_errors=True)
        barrier()

    def _load(self, consumer: Consumer) -> set[int]:
        """Restore saved progress into ``consumer``; returns the batches it covers."""
        rank, world = rank_world()
        done: set[int] = set()
        if not self.path.is_dir():
            return done
        for file in sorted(self.path.glob("*.safetensors")):
            own = file.name.startswith(f"rank{rank}of{world}")
            if not consumer.appends and not own:  # sums are per rank: only this rank's file is ours
                continue
            tensors, meta = load_tensors(file, artifact="checkpoint of an interrupted pass")
            done.update(meta["batches"])
            # appended blocks are summed across ranks once at the end, so one rank holds them
            if not consumer.appends or is_main():
                consumer.restore(tensors)
        return done

    def _save(self, consumer: Consumer, batches: list[int], covered: list[int]) -> None:
        rank, world = rank_world()
        if consumer.appends:
            name, listed = f"rank{rank}of{world}-batch{batches[0]:09d}.safetensors", batches
        else:
            name, listed = f"rank{rank}of{world}.safetensors", covered
        save_tensors(self.path / name, consumer.checkpoint(), {"batches": listed})


def spec_key(spec: dict) -> str:
    """A short hash of a JSON-able description of everything a result depends on."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derive_seed(seed: int, phase: str, start: int) -> int:
    """The RNG seed of the batch at ``start`` in ``phase``: independent of rank and of resumption."""
    h = hashlib.sha256(f"{seed}:{phase}:{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def is_sharded(model: nn.Module) -> bool:
    """Whether parameters are sharded across ranks (FSDP2's ``fully_shard`` or FSDP1)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass (no dropout), the caller's mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _no_sync(model: nn.Module) -> Iterator[None]:
    """DDP must not wait for gradient all-reduces that headwater never triggers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def _progress(iterable: Any, enabled: bool, desc: str, total: int) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True)


def _host_mask(task: Task, host: Any, batch: Any, mask: Any) -> Any:
    """The batch's token mask where reading it costs no device sync: from the collated batch before
    it moved (the same mask, computed on the host), or the device mask when that is the host."""
    if batch is host or not isinstance(mask, (torch.Tensor, TokenMasks)) or _on_cpu(mask):
        return mask
    try:
        return task.token_mask(host)
    except Exception:  # a task whose mask needs the moved batch: read the device mask (one sync)
        return mask


def _on_cpu(mask: torch.Tensor | TokenMasks) -> bool:
    return all(m.device.type == "cpu" for m in (mask.axes if isinstance(mask, TokenMasks) else (mask,)))


def _check_scored(mask: torch.Tensor | TokenMasks | None, start: int, name: str) -> None:
    """Refuse a sequence without scored tokens (read on the host: no device sync in the loop)."""
    if mask is None:
        return
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ExampleError(
            start + empty[0],
            " has no scored tokens (every label is -100 or it is a single token); remove it or unmask its completion",
            f"{name} ",
        )


def _consumer_call(consumer: Consumer, device: torch.device, start: int, first: bool) -> Callable[[LayerCapture], None]:
    """``consumer.update`` for one pseudo-loss of the batch at ``start``, in full precision (no autocast)."""

    def consume(c: LayerCapture) -> None:
        with torch.autocast(device.type, enabled=False):
            consumer.update(c, start, first)

    return consume


def run_pass(
    model: nn.Module,
    task: Task,
    layers: dict[str, LayerAdapter],
    data: Any,
    consumer: Consumer,
    *,
    losses: Losses,
    batch_size: int,
    phase: str,
    name: str = "training data",
    seed: int = 0,
    shard: bool = True,
    checkpoint: Checkpoint | None = None,
    progress: bool = False,
) -> Consumer:
    """One pass over ``data``: for each batch, each pseudo-loss of ``losses(batch)``, each tracked layer,
    ``consumer.update``. Returns ``consumer`` after its ``finish_pass``.

    ``shard``: batch b runs on rank ``b % world`` only (False: every rank runs every batch,
    as for the queries that all ranks hold). ``phase`` names the pass for seeds and progress.
    """
    device = model_device(model)
    rank, world = rank_world() if shard else (0, 1)
    n_batches = (len(data) + batch_size - 1) // batch_size
    done = checkpoint._load(consumer) if checkpoint is not None else set()
    barrier()  # every rank has read the saved progress before any rank writes more
    mine = [b for b in range(n_batches) if b % world == rank and b not in done]
    # A sharded (FSDP) model gathers its parameters collectively in every forward and backward,
    # so each rank runs as many passes as the busiest one: the others repeat a batch whose
    # captures are thrown away.
    fillers = all_reduce_max(len(mine)) - len(mine) if world > 1 and is_sharded(model) else 0
    plan = mine + [mine[-1] if mine else 0] * fillers
    covered, pending = sorted(b for b in done if b % world == rank), []
    batches = _progress(iter_batches(data, task, batch_size, name, plan), progress, phase, len(plan))
    with eval_mode(model), _no_sync(model), Capture(model, layers) as cap:
        for step, (lo, host) in enumerate(batches):
            filler = step >= len(mine)
            batch = task.to_device(host, device)
            mask = task.token_mask(batch)
            _check_scored(_host_mask(task, host, batch, mask), lo, name)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(derive_seed(seed, phase, lo))
                try:
                    ls = losses(batch)
                except Exception:
                    cap.clear()
                    raise
            for k, loss in enumerate(ls):
                # each layer is consumed inside the backward, as soon as its gradient exists
                consume = None if filler else _consumer_call(consumer, device, lo, k == 0)
                cap.stream(loss, mask, consume, retain_graph=k < len(ls) - 1)
            if filler:
                continue
            consumer.finish_batch(lo)
            pending.append(lo // batch_size)
            covered.append(lo // batch_size)
            if checkpoint is not None and checkpoint.every and len(pending) >= checkpoint.every:
                checkpoint._save(consumer, pending, covered)
                pending = []
    consumer.finish_pass()
    return consumer
