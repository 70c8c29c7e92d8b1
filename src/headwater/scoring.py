"""Scoring: preconditioned query gradients against training gradients, in factored form.

``score(q, m) = grad f_q^T (G + lambda I)^-1 grad L_m``, summed over tracked layers.

The query side is small and held in memory: each layer's preconditioned query gradient
``P_q = (G + lambda I)^-1 grad f_q`` is an [O, I] matrix, optionally truncated to rank r as
``U V^T`` (U [Q,O,r], V [Q,I,r]). The training side is never stored. For a batch with
inputs a [N,S,I] and output gradients g [N,S,O]:

    dense:    score = <P_q, sum_s g a^T>              N*O*I*(S + Q) FLOPs
    low-rank: score = sum_s (U^T g) . (V^T a)           N*S*Q*r*(O + I) FLOPs

and the cheaper one is picked per batch. Per-token scores (``g_t^T P_q a_t``) need the
token-resolved form, which is used whenever they are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .capture import LayerCapture
from .curvature import EigenCurvature, LayerCurvature, per_example_grads, rotated_grads
from .errors import check_finite

__all__ = ["Scores", "TopK", "QueryGradients", "ScoreAccumulator", "SelfInfluenceAccumulator"]


class TopK(NamedTuple):
    """Per query: training indices and their scores, [Q, k] each."""

    indices: torch.Tensor
    values: torch.Tensor


@dataclass
class Scores:
    """Influence of training examples (columns) on queries (rows).

    values: [Q, N]. per_layer: {layer: [Q, N]} (sums to ``values``). per_token: [Q, N, T]
    over training tokens, zero-padded to the longest training example (sums to ``values``).
    """

    values: torch.Tensor
    per_layer: dict[str, torch.Tensor] | None = None
    per_token: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def top(self, k: int) -> TopK:
        """The k most positive training examples per query, most positive first."""
        k = min(k, self.values.shape[1])
        v, i = torch.topk(self.values, k, dim=1)
        return TopK(i, v)

    def bottom(self, k: int) -> TopK:
        """The k most negative training examples per query, most negative first."""
        k = min(k, self.values.shape[1])
        v, i = torch.topk(self.values, k, dim=1, largest=False)
        return TopK(i, v)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"values": self.values}
        for name, t in (self.per_layer or {}).items():
            out[f"per_layer::{name}"] = t
        if self.per_token is not None:
            out["per_token"] = self.per_token
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Scores:
        per_layer = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("per_layer::")}
        return cls(tensors["values"], per_layer or None, tensors.get("per_token"), meta or {})


@dataclass
class QueryGradients:
    """One layer's preconditioned query gradients: full [Q,O,I], or low-rank U [Q,O,r], V [Q,I,r]."""

    full: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @classmethod
    def build(cls, p: torch.Tensor, rank: int | None) -> QueryGradients:
        """Truncate P [Q,O,I] to its top-``rank`` singular triplets (exact when rank >= min(O,I)).

        The truncated SVD comes from the fp64 eigendecomposition of the smaller Gram matrix
        (P^T P or P P^T): the top singular pairs are as accurate as a full SVD's, and it is an
        order of magnitude faster than batched ``torch.linalg.svd`` on CPU.
        """
        if rank is None or rank >= min(p.shape[1:]):
            return cls(full=p)
        p64 = p.double()
        if p.shape[2] <= p.shape[1]:  # I <= O: right singular vectors from P^T P [I, I]
            _, vecs = torch.linalg.eigh(p64.mT @ p64)
            v = vecs[..., -rank:].flip(-1)  # top-r, largest first
            u = p64 @ v  # = U_r S_r
        else:
            _, vecs = torch.linalg.eigh(p64 @ p64.mT)
            u_r = vecs[..., -rank:].flip(-1)
            v = p64.mT @ u_r  # = V_r S_r
            u = u_r
        return cls(u=u.to(p.dtype).contiguous(), v=v.to(p.dtype).contiguous())

    @staticmethod
    def concat(parts: list[QueryGradients]) -> QueryGradients:
        if parts[0].full is not None:
            return QueryGradients(full=torch.cat([p.full for p in parts]))
        return QueryGradients(u=torch.cat([p.u for p in parts]), v=torch.cat([p.v for p in parts]))

    @property
    def dense(self) -> torch.Tensor:
        if self.full is None:  # reconstructed once, if the dense form turns out cheaper
            self.full = self.u @ self.v.mT
        return self.full

    def scores(self, c: LayerCapture, per_token: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[Q, N] scores, and [Q, N, S] per-token scores if asked for."""
        a, g = c.a, c.g
        n, s, i = a.shape
        o = g.shape[2]
        if self.u is not None:
            q, r = self.u.shape[0], self.u.shape[2]
            low_rank_cost = n * s * q * r * (o + i)
            if per_token or low_rank_cost < n * o * i * (s + q):
                tok = torch.einsum("nso,qor,nsi,qir->qns", g, self.u, a, self.v)
                return tok.sum(-1), tok if per_token else None
        p = self.dense
        if per_token:
            if i <= o:  # contract the larger side first, keep the smaller intermediate
                tok = torch.einsum("qnsi,nsi->qns", torch.einsum("nso,qoi->qnsi", g, p), a)
            else:
                tok = torch.einsum("qnso,nso->qns", torch.einsum("nsi,qoi->qnso", a, p), g)
            return tok.sum(-1), tok
        dw = per_example_grads(a, g)  # [N, O, I]
        return p.reshape(p.shape[0], -1) @ dw.reshape(n, -1).mT, None


class ScoreAccumulator:
    """Consumer of the training stream: fills the [Q, N] score matrix batch by batch."""

    def __init__(self, queries: dict[str, QueryGradients], n_train: int, per_layer: bool, per_token: bool):
        self.queries = queries
        q = next(iter(queries.values()))
        n_q = (q.full if q.full is not None else q.u).shape[0]
        self.dtype = (q.full if q.full is not None else q.u).dtype
        self.values = torch.zeros(n_q, n_train, dtype=self.dtype)
        self.per_layer = {n: torch.zeros(n_q, n_train, dtype=self.dtype) for n in queries} if per_layer else None
        self.per_token = per_token
        self._tokens: dict[int, torch.Tensor] = {}  # batch start -> [Q, N_b, S_b]

    def update(self, c: LayerCapture, start: int) -> None:
        sc, tok = self.queries[c.name].scores(c, self.per_token)
        check_finite(sc, c.name, "scores")
        sc = sc.to("cpu", self.dtype)
        stop = start + sc.shape[1]
        self.values[:, start:stop] += sc
        if self.per_layer is not None:
            self.per_layer[c.name][:, start:stop] += sc
        if tok is not None:
            # a module called k times per forward: fold its k*S tokens back onto the sequence
            tok = tok.reshape(*tok.shape[:2], c.calls, -1).sum(2).to("cpu", self.dtype)
            prev = self._tokens.get(start)
            self._tokens[start] = tok if prev is None else prev + tok

    def result(self, meta: dict) -> Scores:
        per_token = None
        if self.per_token:
            t = max(x.shape[2] for x in self._tokens.values())
            per_token = torch.zeros(*self.values.shape, t, dtype=self.dtype)
            for start, x in self._tokens.items():
                per_token[:, start : start + x.shape[1], : x.shape[2]] = x
        return Scores(self.values, self.per_layer, per_token, meta)


class SelfInfluenceAccumulator:
    """Consumer of the training stream: grad L_m^T (G + lambda I)^-1 grad L_m for every m."""

    def __init__(self, curvature: dict[str, LayerCurvature], damping: dict[str, float], n_train: int):
        self.curvature = curvature
        self.damping = damping
        self.values = torch.zeros(n_train, dtype=torch.float64)

    def update(self, c: LayerCapture, start: int) -> None:
        op, lam = self.curvature[c.name], self.damping[c.name]
        if isinstance(op, EigenCurvature):
            r = rotated_grads(c, op)
            val = (r * r / (op._as(r)[2] + lam)).sum((1, 2))
        else:
            dw = per_example_grads(c.a, c.g)
            val = (dw * op.solve(dw, lam)).sum((1, 2))
        check_finite(val, c.name, "self-influence")
        self.values[start : start + val.shape[0]] += val.double().cpu()
