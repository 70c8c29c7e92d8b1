"""Before a long run: how much memory, disk and time each stage will need (``headwater plan``).

    plan = an.plan(train, batch_size=8, queries=100)          # or: headwater plan --model ... --data ...
    print(plan.table())
    plan.max_batch_size(16 * 2**30)                           # the largest batch that fits in 16 GiB

What is computed and what is measured:

- **Factors, accumulators, eigendecompositions, score buffers, files**: exact sizes from the
  tracked layers' shapes (float64 factors, float32 scores), not guesses.
- **Activations, captures and the backward's transient buffers**: measured in a probe of one
  batch: the peak of resident memory above the baseline, sampled every millisecond (on GPU,
  ``torch.cuda.max_memory_allocated``).
- **Baseline**: the process as it is now (the model loaded): resident memory on CPU,
  ``torch.cuda.memory_allocated`` on GPU.
- **Time**: the probe's wall time per batch times the batches of each pass, and each
  eigendecomposition timed on a 256 x 256 matrix and scaled by n^3.

The activation and capture terms grow linearly with the batch size; everything else is fixed,
which is what ``max_batch_size`` solves for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import check_data
from .engine import Consumer, LayerCapture
from .validation import check_int

__all__ = ["Plan", "Stage", "plan_run", "process_memory"]


def process_memory(device: torch.device) -> int:
    """Bytes in use now: resident set size on CPU (Linux /proc, else the peak so far), allocated on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stage:
    """One stage's needs: ``fixed`` + ``per_example`` x batch size bytes of memory, disk bytes, seconds."""

    name: str
    fixed: int
    per_example: int
    disk: int
    seconds: float
    detail: dict = field(default_factory=dict)

    def memory(self, batch_size: int) -> int:
        return self.fixed + self.per_example * batch_size


@dataclass
class Plan:
    batch_size: int
    baseline: int  # bytes in use before the run (model, libraries)
    stages: list[Stage]
    device: str

    def peak(self, batch_size: int | None = None) -> int:
        b = self.batch_size if batch_size is None else batch_size
        return self.baseline + max(s.memory(b) for s in self.stages)

    def max_batch_size(self, budget: int) -> int:
        """The largest batch size whose every stage fits in ``budget`` bytes (0 if none does)."""
        best = None
        for s in self.stages:
            room = budget - self.baseline - s.fixed
            fits = room // s.per_example if s.per_example > 0 else (1 << 30 if room >= 0 else 0)
            best = fits if best is None else min(best, fits)
        return max(0, int(best or 0))

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "baseline": self.baseline,
            "device": self.device,
            "stages": [
                {
                    "name": s.name,
                    "memory": s.memory(self.batch_size),
                    "fixed": s.fixed,
                    "per_example": s.per_example,
                    "disk": s.disk,
                    "seconds": s.seconds,
                    **s.detail,
                }
                for s in self.stages
            ],
        }

    def table(self) -> str:
        lines = [f"plan at batch size {self.batch_size} on {self.device} (baseline {human(self.baseline)} in use now)"]
        lines.append(f"  {'stage':<34} {'peak memory':>12} {'disk':>10} {'time':>10}")
        for s in self.stages:
            peak = self.baseline + s.memory(self.batch_size)
            lines.append(f"  {s.name:<34} {human(peak):>12} {human(s.disk):>10} {_duration(s.seconds):>10}")
        total = sum(s.seconds for s in self.stages)
        lines.append(
            f"  {'all':<34} {human(self.peak()):>12} {human(sum(s.disk for s in self.stages)):>10} "
            f"{_duration(total):>10}"
        )
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


class _Probe(Consumer):
    """Counts the bytes of one batch's captures (``a`` and ``g`` of every layer)."""

    def __init__(self) -> None:
        self.capture_bytes = 0

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        if first:
            self.capture_bytes += c.a.numel() * c.a.element_size() + c.g.numel() * c.g.element_size()


class _PeakSampler:
    """The highest resident memory seen while it runs, sampled every millisecond by a thread (CPU).

    Large tensors are mmapped and unmapped by the allocator, so resident memory follows the
    live tensors; the backward pass's transient gradients (several logits-sized buffers for a
    language model) are part of the peak and would be missed by counting saved tensors alone.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, False

    def __enter__(self) -> _PeakSampler:
        import threading

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak = process_memory(self.device)

        def sample() -> None:
            while not self._stop:
                self.peak = max(self.peak, process_memory(self.device))
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, process_memory(self.device))


def _probe(an: Any, data: Any, batch_size: int) -> tuple[int, int, float]:
    """(peak bytes above the baseline, capture bytes, seconds) of the fit losses on the first batch."""
    from .data import Subset

    first = Subset(data, range(min(batch_size, len(data))))
    before = process_memory(an.device)
    with _PeakSampler(an.device) as peak:
        an.run(first, _Probe(), an.fit_losses, "plan probe", batch_size, shard=False)  # warm-up (allocator, caches)
        t = time.perf_counter()
        probe = an.run(first, _Probe(), an.fit_losses, "plan probe", batch_size, shard=False)
        seconds = time.perf_counter() - t
    return max(0, peak.peak - before), probe.capture_bytes, seconds


def _eigh_seconds(n: int, reference: float) -> float:
    return reference * (n / 256) ** 3


def plan_run(
    an: Any,
    data: Any,
    batch_size: int = 8,
    queries: int = 0,
    query_rank: int | None = 32,
    per_layer: bool = True,
    per_token: bool = False,
    index_dim: int | None = None,
) -> Plan:
    """Memory, disk and time of fitting ``an`` on ``data`` and scoring ``queries`` queries against it.

    One batch of ``data`` is run (twice: a warm-up, then the measurement); nothing is written.
    """
    data = check_data(data, "training data")
    batch_size, queries = check_int(batch_size, "batch_size"), check_int(queries, "queries", low=0)
    n, device = len(data), an.device
    baseline = process_memory(device)
    grown, captured, seconds = _probe(an, data, batch_size)
    b = min(batch_size, n)
    act_per_example, cap_per_example = grown // b, 0  # the measured peak already holds the captures
    batches = math.ceil(n / batch_size)
    shapes = list(an.shapes.values())
    kfac = an.strategy in ("kfac", "ekfac")
    sums = 8 * sum(i * i + o * o for o, i in shapes) if kfac else 8 * sum(o * i for o, i in shapes)
    factors = 8 * sum((i * i + o * o + o * i) if kfac else o * i for o, i in shapes) if an.strategy != "identity" else 0
    a = torch.randn(256, 256, dtype=torch.float64)
    t = time.perf_counter()
    from .curvature import symmetric_eigh

    symmetric_eigh(a @ a.T)
    ref = time.perf_counter() - t
    biggest = sorted((max(i, o) for o, i in shapes), reverse=True)[:2]
    eigh_mem = sum(3 * 8 * m * m for m in biggest) if kfac else 0  # matrix, eigenvectors, workspace; 2 at once
    eigh_time = sum(_eigh_seconds(i, ref) + _eigh_seconds(o, ref) for o, i in shapes) / 2 if kfac else 0.0
    stages = []
    passes = {"identity": 0, "diagonal": 1, "kfac": 1, "ekfac": 2}[an.strategy]
    if passes:
        stages.append(
            Stage(
                "fit: passes over the data",
                sums + factors,
                act_per_example + cap_per_example,
                factors,
                passes * batches * seconds,
                {"passes": passes, "batches": batches},
            )
        )
    if kfac:
        stages.append(
            Stage(
                "fit: eigendecompositions",
                sums + factors + eigh_mem,
                0,
                0,
                eigh_time,
                {"largest_factor": biggest[0] if biggest else 0},
            )
        )
    if queries:
        layers = len(shapes) if per_layer else 0
        qgrads, out = score_sizes(shapes, queries, n, query_rank, per_layer)
        tokens = 4 * queries * n * _max_tokens(an, data) if per_token else 0
        per_batch = 4 * queries * (1 + layers) * 2  # the batch's scores, on the device and on the CPU
        stages.append(
            Stage(
                "score: queries x training data",
                factors + qgrads + out + tokens,
                act_per_example + cap_per_example + per_batch,
                out + tokens,
                batches * seconds + math.ceil(queries / batch_size) * seconds,
                {"query_gradients": qgrads},
            )
        )
    if index_dim:
        d = sum(min(index_dim, o) * min(index_dim, i) for o, i in shapes)
        stages.append(
            Stage(
                "index: records",
                4 * min(n, 4096) * d,
                act_per_example + cap_per_example,
                2 * n * d,
                batches * seconds,
                {"record_dim": d},
            )
        )
    return Plan(batch_size, baseline, stages, str(device))


def score_sizes(
    shapes: list[tuple[int, int]], queries: int, n: int, query_rank: int | None, per_layer: bool = True
) -> tuple[int, int]:
    """Bytes of the preconditioned query gradients and of the ``[Q, N]`` scores (total and per layer).

    A rank-``r`` query gradient of an ``[out, in]`` layer is stored as two factors, ``r (out + in)``
    float32 values, unless the full matrix is smaller; the scores are float32.
    """
    rank = query_rank or 0
    qgrads = 4 * queries * sum((rank * (o + i)) if rank and rank < min(o, i) else o * i for o, i in shapes)
    return qgrads, 4 * queries * n * (1 + (len(shapes) if per_layer else 0))


def _max_tokens(an: Any, data: Any, sample: int = 64) -> int:
    """The longest tokenized example among a strided sample (per-token scores are padded to the longest)."""
    step = max(1, len(data) // sample)
    return max(an.task.collate([data[i]])["input_ids"].shape[-1] for i in range(0, len(data), step))
