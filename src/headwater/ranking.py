"""Scoring a large corpus with memory flat in N: each query's top-k and bottom-k kept on the fly.

``Attributor.scores`` assembles the full [Q, N] matrix (and per-layer [Q, N] per layer): fine
for thousands of documents, not for millions. ``RankingAccumulator`` consumes the same scoring
pass but keeps, per query, only the k most positive and k most negative sequences (with their
per-layer parts), running statistics over all N (count, positives, mean, std, min, max), and,
when asked, writes the full [Q, N] float32 scores to a memory-mapped file batch by batch.

    ranking = an.rank(queries, train, k=20, values_path="runs/a/values.f32")
    ranking.top.indices, ranking.top.values      # [Q, k], most positive first
    ranking.values()                             # [Q, N] memory-mapped (only with values_path)

Per batch the merge is one ``topk`` over [Q, k + batch] on the model's device and one transfer
of the batch's scores (for the file); nothing grows with N but the file on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import all_reduce_, rank_world
from .engine import Consumer, LayerCapture
from .errors import NonFiniteError
from .scoring import QueryGradients, TopK

__all__ = ["Ranking", "RankingAccumulator"]


@dataclass
class Ranking:
    """Per query: the top-k and bottom-k training sequences, per-layer parts, statistics over all N."""

    top: TopK
    bottom: TopK
    top_layers: dict[str, torch.Tensor] | None  # {layer: [Q, k]} at ``top.indices``
    bottom_layers: dict[str, torch.Tensor] | None
    stats: dict[str, torch.Tensor]  # {"n", "positive", "mean", "std", "min", "max"}: [Q] each
    n_train: int
    values_path: Path | None = None
    meta: dict = field(default_factory=dict)

    def values(self) -> torch.Tensor:
        """The full [Q, N] float32 scores, memory-mapped from ``values_path`` (read-only)."""
        if self.values_path is None:
            raise ValueError("this ranking kept no full score matrix; pass values_path= to rank() to write one")
        q = self.top.values.shape[0]
        return torch.from_numpy(np.memmap(self.values_path, dtype="<f4", mode="c", shape=(q, self.n_train)))


class RankingAccumulator(Consumer):
    """Consumer of the scoring pass that keeps each query's top-k and bottom-k (see the module docstring)."""

    def __init__(
        self, queries: dict[str, QueryGradients], n_train: int, k: int, per_layer: bool, values_path: Any = None
    ):
        self.queries, self.n_train, self.per_layer = queries, n_train, per_layer
        ref = next(iter(queries.values()))
        ref = ref.full if ref.full is not None else ref.u
        self.n_queries, self.device, self.dtype = ref.shape[0], ref.device, ref.dtype
        self.k = min(k, n_train)
        self.names = list(queries)
        q, dev = self.n_queries, self.device
        layers = len(self.names) if per_layer else 0
        # running state, all [Q, ...] on the model's device; rows of "parts" are the layers' shares
        empty = torch.empty(q, 0, device=dev, dtype=torch.float64)
        self.state = {
            "top_v": empty,
            "top_i": torch.empty(q, 0, dtype=torch.long, device=dev),
            "bot_v": empty,
            "bot_i": torch.empty(q, 0, dtype=torch.long, device=dev),
            "top_p": torch.empty(layers, q, 0, device=dev, dtype=torch.float64),
            "bot_p": torch.empty(layers, q, 0, device=dev, dtype=torch.float64),
            "n": torch.zeros(q, device=dev, dtype=torch.float64),
            "sum": torch.zeros(q, device=dev, dtype=torch.float64),
            "sumsq": torch.zeros(q, device=dev, dtype=torch.float64),
            "positive": torch.zeros(q, device=dev, dtype=torch.float64),
            "min": torch.full((q,), float("inf"), device=dev, dtype=torch.float64),
            "max": torch.full((q,), float("-inf"), device=dev, dtype=torch.float64),
        }
        self.batch: dict[str, torch.Tensor] = {}
        self.values_path = Path(values_path) if values_path is not None else None
        self._file = None
        if self.values_path is not None:
            self.values_path.parent.mkdir(parents=True, exist_ok=True)
            mode = "r+" if self.values_path.exists() else "w+"
            self._file = np.memmap(self.values_path, dtype="<f4", mode=mode, shape=(q, n_train))

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        sc, _ = self.queries[c.name].scores(c, per_token=False)
        sc = sc.double()
        self.batch["values"] = sc if "values" not in self.batch else self.batch["values"] + sc
        if self.per_layer:
            self.batch[c.name] = sc

    def _merge(self, vals: torch.Tensor, cols: torch.Tensor, parts: torch.Tensor, side: str, largest: bool) -> None:
        s = self.state
        v = torch.cat([s[f"{side}_v"], vals], dim=1)
        i = torch.cat([s[f"{side}_i"], cols.expand(vals.shape[0], -1)], dim=1)
        p = torch.cat([s[f"{side}_p"], parts], dim=2)
        keep_v, pos = torch.topk(v, min(self.k, v.shape[1]), dim=1, largest=largest)
        s[f"{side}_v"], s[f"{side}_i"] = keep_v, i.gather(1, pos)
        s[f"{side}_p"] = p.gather(2, pos.unsqueeze(0).expand(p.shape[0], -1, -1))

    def finish_batch(self, start: int) -> None:
        vals = self.batch.pop("values")  # [Q, B]
        parts = (
            torch.stack([self.batch.pop(n) for n in self.names]) if self.per_layer else vals.new_zeros(0, *vals.shape)
        )
        self.batch.clear()
        cols = torch.arange(start, start + vals.shape[1], device=vals.device)
        s = self.state
        s["n"] += vals.shape[1]
        s["sum"] += vals.sum(1)
        s["sumsq"] += (vals * vals).sum(1)
        s["positive"] += (vals > 0).sum(1)
        s["min"] = torch.minimum(s["min"], vals.min(1).values)
        s["max"] = torch.maximum(s["max"], vals.max(1).values)
        self._merge(vals, cols, parts, "top", largest=True)
        self._merge(vals, cols, parts, "bot", largest=False)
        if self._file is not None:  # the one transfer per batch
            self._file[:, start : start + vals.shape[1]] = vals.to("cpu", torch.float32).numpy()

    def checkpoint(self) -> dict[str, torch.Tensor]:
        if self._file is not None:
            self._file.flush()
        return dict(self.state)

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.to(self.device) for k, v in tensors.items()}

    def finish_pass(self) -> None:
        """Merge the ranks' rankings: every rank's candidates gathered, then one topk."""
        rank, world = rank_world()
        if world == 1:
            return
        s = self.state
        for key in ("n", "sum", "sumsq", "positive"):
            all_reduce_({key: s[key]})
        for key in ("min", "max"):  # each rank fills its own slot; the sum across ranks is then a gather
            gathered = torch.zeros((world, *s[key].shape), dtype=s[key].dtype, device=s[key].device)
            gathered[rank] = s[key]
            all_reduce_({key: gathered})
            s[key] = gathered.min(0).values if key == "min" else gathered.max(0).values
        for side, largest in (("top", True), ("bot", False)):
            v, i, p = s[f"{side}_v"], s[f"{side}_i"], s[f"{side}_p"]
            k = v.shape[1]
            gv = torch.zeros(world, *v.shape, dtype=v.dtype, device=v.device)
            gi = torch.zeros(world, *i.shape, dtype=i.dtype, device=i.device)
            gp = torch.zeros(world, *p.shape, dtype=p.dtype, device=p.device)
            gv[rank], gi[rank], gp[rank] = v, i, p
            all_reduce_({"v": gv, "i": gi, "p": gp})
            allv, alli = gv.permute(1, 0, 2).reshape(v.shape[0], -1), gi.permute(1, 0, 2).reshape(i.shape[0], -1)
            allp = gp.permute(1, 2, 0, 3).reshape(p.shape[0], p.shape[1], -1)
            keep, pos = torch.topk(allv, k, dim=1, largest=largest)
            s[f"{side}_v"], s[f"{side}_i"] = keep, alli.gather(1, pos)
            s[f"{side}_p"] = allp.gather(2, pos.unsqueeze(0).expand(allp.shape[0], -1, -1))

    def result(self, meta: dict) -> Ranking:
        s = {k: v.cpu() for k, v in self.state.items()}
        if not (torch.isfinite(s["top_v"]).all() and torch.isfinite(s["bot_v"]).all()):
            raise NonFiniteError(
                "scores have non-finite values; the model may overflow in this dtype (try float32), or its "
                "weights or inputs contain NaN/inf"
            )
        n = s["n"].clamp_min(1)
        mean = s["sum"] / n
        std = ((s["sumsq"] / n - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)).sqrt()
        stats = {"n": s["n"], "positive": s["positive"], "mean": mean, "std": std, "min": s["min"], "max": s["max"]}
        layers = (lambda p: {name: p[j] for j, name in enumerate(self.names)}) if self.per_layer else (lambda p: None)
        if self._file is not None:
            self._file.flush()
        return Ranking(
            TopK(s["top_i"], s["top_v"]),
            TopK(s["bot_i"], s["bot_v"]),
            layers(s["top_p"]),
            layers(s["bot_p"]),
            stats,
            self.n_train,
            self.values_path,
            meta,
        )
