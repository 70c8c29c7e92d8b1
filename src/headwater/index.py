"""A persistent projected-gradient index (LoGra-style): pay one pass over the training data,
then answer queries by scanning small stored records instead of recomputing gradients.

    an = hw.Attributor(model, modules="mlp", workdir="runs/a").fit(train)
    build_index(an, train, dim=32)                  # -> runs/a/index/
    res = query_index(an, queries, top_k=10)        # Scores, values [Q, N]
    res.top(10)

Why it is cheap (Choe et al. 2024, "What is your data worth to GPT?"). A tracked layer's
per-sequence gradient is ``dW_m = sum_t g_t a_t^T`` [O, I]. Projecting both of its sides with
``P_out`` [k_out, O] and ``P_in`` [k_in, I] gives

    P_out dW_m P_in^T = sum_t (P_out g_t)(P_in a_t)^T = (g P_out^T)^T (a P_in^T)

which costs S*(O*k_out + I*k_in + k_out*k_in) per sequence and never forms the [O, I]
gradient. So the index is just the engine's capture stream with projected ``a`` and ``g``:
the same ``per_example_grads`` turns them into [N, k_out, k_in] records.

Projection sizes: ``k_in = min(dim, I)``, ``k_out = min(dim, O)`` per layer, so a record holds
``sum_layers k_out * k_in`` numbers (dim=32 and GPT-2's 2 MLP layers per block: 2048 per block).
Projections are seeded Gaussian, Rademacher or random-orthogonal matrices scaled so that
``E[P^T P] = I`` (inner products are preserved in expectation), or ``"kfac"``: the top
eigenvectors of the attributor's fitted K-FAC/EK-FAC factors (LoGra's PCA initialisation),
ranked by their share of the fitted eigenvalues.

Curvature in the projected space (``curvature=``). With ``r = vec(P_out dW P_in^T)`` and
``P = P_out kron P_in``:

- ``"engine"`` (the default for a fitted K-FAC/EK-FAC/diagonal attributor while every layer has
  ``k_out * k_in <= 4096``): ``P G P^T`` of the attributor's own fitted G, formed densely from
  its factors and eigendecomposed once. No pass over data, and the closest match to the
  engine's scores (benchmarks/results/index.md).
- ``"ekfac"`` / ``"kfac"`` (the default otherwise): the engine's EK-FAC (K-FAC) run on the
  projected captures: ``A_p = P_in A P_in^T``, ``S_p = P_out S P_out^T``, eigenbases, then the
  eigenvalue correction from projected pseudo-gradients (two passes, one for K-FAC), with the
  attributor's ``fisher`` and the engine's per-batch label seeds.
- ``"dense"``: the damped Gauss-Newton ``G_p = E_m[r_m r_m^T]`` fitted on projected
  pseudo-gradients (one pass). Exact in expectation, but a d x d estimate from N sequences is
  noisy once d approaches N, and it matched exact EK-FAC worse than the two above.
- ``"identity"``: projected gradient dot products.

Each query is preconditioned once, ``(G_p + lambda I)^-1 r_q``, and scored against every record
by one matrix product per shard. With full-dimensional orthogonal projections ``P`` is a
rotation, ``(P G P^T + lambda I)^-1 = P (G + lambda I)^-1 P^T`` and the index scores equal the
engine's exactly; with fewer dimensions they approximate them (benchmarks/results/index.md).

On disk (one directory)::

    manifest.json             config, layer layout, fingerprints, shards (file, record range,
                              bytes, sha256), curvature entry, complete flag
    projections.safetensors   {layer}::out [k_out, O], {layer}::in [k_in, I] (float64)
    shard-00000.bin ...       raw little-endian records [n, D], dataset order; layer l's block
                              is columns offset_l : offset_l + k_out*k_in, row-major [k_out, k_in]
    curvature.safetensors     the projected curvature per layer

Raw arrays (not safetensors) so a shard is one ``numpy.memmap`` with no header to parse.
Every file is written to a temporary name and renamed; the manifest is rewritten after each
shard, so an interrupted build resumes at the next missing shard and yields the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .curvature import (
    INVERSE,
    CovarianceAccumulator,
    DenseAccumulator,
    DenseEigenCurvature,
    DiagonalCurvature,
    EigenCurvature,
    IdentityCurvature,
    Inverse,
    LambdaAccumulator,
    LayerCurvature,
    Projected,
    resolve_damping,
    symmetric_eigh,
)
from .data import check_data, fingerprint
from .distributed import barrier, rank_world
from .engine import Consumer, LayerCapture
from .errors import NotFittedError, check_finite
from .scoring import Scores
from .storage import atomic_write_bytes, load_json, load_tensors, model_fingerprint, save_json, save_tensors
from .validation import check_choice, check_int, check_seed

__all__ = [
    "build_index",
    "query_index",
    "query_gradients",
    "make_projections",
    "layout_for",
    "random_projection",
    "GradientIndex",
    "IndexLayer",
    "CorruptIndexError",
    "ProjectedDenseCurvature",
    "PROJECTIONS",
    "INDEX_DTYPES",
    "INDEX_CURVATURES",
    "DEFAULT_DIM",
]

FORMAT = "headwater-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTIONS_FILE = "projections.safetensors"
CURVATURE_FILE = "curvature.safetensors"

PROJECTIONS = ("gaussian", "rademacher", "orthogonal", "kfac")
INDEX_CURVATURES = ("auto", "engine", "ekfac", "kfac", "dense", "identity")
# storage dtype -> (numpy dtype of the raw file, torch dtype it is read as). bfloat16 has no
# numpy type, so it is stored as little-endian int16 bit patterns and viewed back.
INDEX_DTYPES = {
    "float16": ("<f2", torch.float16),
    "bfloat16": ("<i2", torch.bfloat16),
    "float32": ("<f4", torch.float32),
}
# 32 x 32 per layer: 2048 floats (4 KiB in float16) per GPT-2 block's two MLP layers. Agreement
# with exact EK-FAC grows with dim (benchmarks/results/index.md: Spearman 0.31 / 0.50 / 0.71 and
# top-10 overlap 0.26 / 0.58 / 0.71 at dim 16 / 32 / 64): 32 more than doubles the top-10
# agreement of 16 for 4x the disk, which is the better value for a research tool; pass dim=64
# when the index should stand in for exact scores, 16 when disk and scan latency matter most.
DEFAULT_DIM = 32
# Dense projected curvature up to 4096 = 64 x 64 coordinates per layer: [4096, 4096] float64 is
# 128 MiB and one eigh of it takes seconds; beyond that "auto" picks projected EK-FAC.
DENSE_MAX = 4096
# Records per shard: the unit of resumption and of distributed work. 4096 records keeps a
# shard around 4 MiB at the default size and the resume loss under a minute of work on GPU.
DEFAULT_SHARD_SIZE = 4096
# Records converted to float32 per step of a scan: 8 MiB stays in L2/L3 between the conversion
# and the product. Large blocks measured 2-3x slower on CPU (benchmarks/results/index.md).
_SCAN_BLOCK_BYTES = 1 << 23


class CorruptIndexError(ValueError):
    """A shard or side file of an index does not match its manifest (truncated, altered, missing)."""


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _derive(seed: int, *parts: str) -> int:
    h = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


class _Slice:
    """``data[start:stop]`` as a sized, indexable view (all that the engine's batching needs)."""

    def __init__(self, data: Any, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        return self.data[self.start + i]


# ---------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexLayer:
    """Where one tracked layer lives in a record: columns ``offset : offset + k_out * k_in``."""

    name: str
    out_features: int  # O
    in_features: int  # I, bias column included
    k_out: int
    k_in: int
    offset: int

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "k_out": self.k_out,
            "k_in": self.k_in,
            "offset": self.offset,
        }


def layout_for(layers: dict, dim: int) -> list[IndexLayer]:
    out, offset = [], 0
    for name, ad in layers.items():
        k_out, k_in = min(dim, ad.out_features), min(dim, ad.in_features)
        out.append(IndexLayer(name, ad.out_features, ad.in_features, k_out, k_in, offset))
        offset += k_out * k_in
    return out


def random_projection(kind: str, k: int, n: int, seed: int) -> torch.Tensor:
    """[k, n] float64 with E[P^T P] = I, from a generator seeded per layer and side."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(k, n, generator=gen, dtype=torch.float64) / math.sqrt(k)
    if kind == "rademacher":
        return (torch.randint(0, 2, (k, n), generator=gen) * 2 - 1).to(torch.float64) / math.sqrt(k)
    # orthogonal: k orthonormal rows (Haar-distributed via QR with sign fix), scaled by sqrt(n/k)
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.mT.contiguous() * math.sqrt(n / k)


def _kfac_projection(op: LayerCurvature, name: str, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenvectors of the fitted factors: LoGra's PCA initialisation.

    Directions are ranked by their share of the fitted eigenvalues, ``lam.sum(0)`` over Q_A's
    columns and ``lam.sum(1)`` over Q_S's: for K-FAC (lam = outer(eig_S, eig_A)) that is the
    order of the factors' own eigenvalues, and for EK-FAC it follows the corrected ones.
    """
    if not isinstance(op, EigenCurvature):
        raise ValueError(
            f"projection='kfac' takes the top eigenvectors of K-FAC/EK-FAC factors, but layer {name!r} has a "
            f"{type(op).__name__}; use an Attributor with strategy='kfac' or 'ekfac', or projection='gaussian'"
        )
    lam = op.lam.double().cpu()
    top_in = torch.argsort(lam.sum(0), descending=True, stable=True)[:k_in]
    top_out = torch.argsort(lam.sum(1), descending=True, stable=True)[:k_out]
    p_out = op.q_s.double().cpu()[:, top_out].mT.contiguous()
    p_in = op.q_a.double().cpu()[:, top_in].mT.contiguous()
    return p_out, p_in


def make_projections(
    attributor: Any, layout: list[IndexLayer], kind: str, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (P_out [k_out, O], P_in [k_in, I])}, float64 on CPU."""
    if kind == "kfac":
        if attributor.curvature is None:
            raise NotFittedError(
                "projection='kfac' needs fitted K-FAC/EK-FAC factors; call an.fit(train) first, "
                "or use projection='gaussian'"
            )
        return {ly.name: _kfac_projection(attributor.curvature[ly.name], ly.name, ly.k_out, ly.k_in) for ly in layout}
    return {
        ly.name: (
            random_projection(kind, ly.k_out, ly.out_features, _derive(seed, "projection", ly.name, "out")),
            random_projection(kind, ly.k_in, ly.in_features, _derive(seed, "projection", ly.name, "in")),
        )
        for ly in layout
    }


# ---------------------------------------------------------------------------------------
# Curvature in the projected space
# ---------------------------------------------------------------------------------------


ProjectedDenseCurvature = DenseEigenCurvature  # the name this module exported before the curvature package


class _Records(Consumer):
    """Projected training gradients of one shard as float32 records [n, D], in dataset order."""

    def __init__(self, n: int, layout: list[IndexLayer], projector: Projected):
        self.buf = torch.zeros(n, layout[-1].offset + layout[-1].size, dtype=torch.float32)
        self.where = {ly.name: slice(ly.offset, ly.offset + ly.size) for ly in layout}
        self.projector = projector

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        r = self.projector.records(c)  # [N, k_out, k_in]
        self.buf[start : start + r.shape[0], self.where[c.name]] = r.reshape(r.shape[0], -1).to("cpu", torch.float32)


class _ProjectedQueries(Consumer):
    """Preconditioned projected query gradients ``(G_p + lambda I)^-1 r_q`` per layer, float64 on CPU."""

    def __init__(
        self,
        projector: Projected,
        curvature: dict[str, LayerCurvature],
        damping: dict[str, float],
        response: Inverse = INVERSE,
    ):
        self.projector, self.curvature, self.damping, self.response = projector, curvature, damping, response
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in curvature}

    def update(self, c: LayerCapture, start: int, first: bool) -> None:
        r = self.projector.records(c).double()  # precondition in float64: once per query, cheap
        p = self.curvature[c.name].solve(r, self.damping[c.name], self.response)
        self.parts[c.name].append(
            check_finite(p, c.name, "preconditioned query gradient").reshape(p.shape[0], -1).cpu()
        )


def _projected_engine_curvature(op: LayerCurvature, p_out: torch.Tensor, p_in: torch.Tensor, name: str) -> Any:
    """``P G P^T`` (P = P_out kron P_in) for the attributor's fitted G, dense in the projected space.

    K-FAC/EK-FAC: G = (Q_S kron Q_A) diag(vec lam) (Q_S kron Q_A)^T; diagonal: Q = I, lam = diag.
    With U = P_out Q_S [k_out, O] and V = P_in Q_A [k_in, I]:
        G_p[(a,b), (c,d)] = sum_{o,i} U_ao V_bi lam_oi U_co V_di
    costs O*I*k_in^2 + O*k_out^2*k_in^2 flops and no pass over data.
    """
    if isinstance(op, EigenCurvature):
        u, v, lam = p_out @ op.q_s.double().cpu(), p_in @ op.q_a.double().cpu(), op.lam.double().cpu()
    elif isinstance(op, DiagonalCurvature):
        u, v, lam = p_out, p_in, op.diag.double().cpu()
    else:
        raise ValueError(
            f"curvature='engine' projects the attributor's fitted curvature, but layer {name!r} has a "
            f"{type(op).__name__} (strategy='identity' has none); use curvature='ekfac' or 'dense'"
        )
    k_out, k_in, o = u.shape[0], v.shape[0], u.shape[1]
    # Two GEMMs in an explicit order (no einsum path search), intermediates no larger than the
    # inputs and the output: W = lam [O, I] x (V_bi V_di) [I, k_in^2], then
    # (U_ao U_co) [k_out^2, O] x W [O, k_in^2] -> [a, c, b, d].
    vv = (v.mT.unsqueeze(2) * v.mT.unsqueeze(1)).reshape(v.shape[1], k_in * k_in)  # [I, k_in^2]
    w = lam @ vv  # [O, k_in^2]
    uu = (u.unsqueeze(1) * u.unsqueeze(0)).reshape(k_out * k_out, o)  # [k_out^2, O]
    g = (uu @ w).reshape(k_out, k_out, k_in, k_in).permute(0, 2, 1, 3)
    g = g.reshape(k_out * k_in, k_out * k_in)
    e, q = symmetric_eigh(check_finite((g + g.mT) / 2, name, "projected engine curvature"))
    return DenseEigenCurvature(e.clamp_min(0), q, (k_out, k_in))


def _fit_projected_curvature(
    an: Any, data: Any, batch_size: int, projections: dict, layout: list[IndexLayer], kind: str
) -> dict[str, LayerCurvature]:
    """The projected curvature: the engine's accumulators on projected captures (``Projected``).

    The phase names are the engine's ("covariance", "eigenvalue correction"), so every batch
    draws the same pseudo-labels as the engine's own fit of the same data and batch size.
    """
    shapes = {ly.name: (ly.k_out, ly.k_in) for ly in layout}
    if kind == "identity":
        return {n: IdentityCurvature(shape) for n, shape in shapes.items()}
    if kind == "engine":
        if an.curvature is None:
            raise NotFittedError(
                "curvature='engine' projects the attributor's fitted curvature; call an.fit(train) first, "
                "or use curvature='ekfac'"
            )
        return {
            ly.name: _projected_engine_curvature(an.curvature[ly.name], *projections[ly.name], ly.name) for ly in layout
        }

    def fit(acc: Consumer, phase: str) -> None:
        an.run(data, Projected(acc, projections), an.fit_losses, phase, batch_size, name="curvature data")

    device = an.device
    if kind == "dense":
        dense = DenseAccumulator(shapes, device)
        fit(dense, "covariance")
        return dense.dense()
    cov = CovarianceAccumulator(shapes, device)
    fit(cov, "covariance")
    bases = cov.kfac()
    if kind == "kfac":
        return bases
    lam = LambdaAccumulator(bases, device)
    fit(lam, "eigenvalue correction")
    return lam.ekfac()


def _curvature_from_tensors(kind: str, layout: list[IndexLayer], tensors: dict[str, torch.Tensor]) -> dict:
    out: dict[str, LayerCurvature] = {}
    for ly in layout:
        if kind == "identity":
            out[ly.name] = IdentityCurvature((ly.k_out, ly.k_in))
        elif kind in ("dense", "engine"):
            out[ly.name] = DenseEigenCurvature(
                tensors[f"{ly.name}::eigvals"], tensors[f"{ly.name}::eigvecs"], (ly.k_out, ly.k_in)
            )
        else:
            out[ly.name] = EigenCurvature(
                tensors[f"{ly.name}::q_a"], tensors[f"{ly.name}::q_s"], tensors[f"{ly.name}::lam"]
            )
    return out


# ---------------------------------------------------------------------------------------
# Reading an index
# ---------------------------------------------------------------------------------------

# Shards whose sha256 was checked in this process, keyed by (path, size, mtime_ns, sha256):
# interactive use re-opens the index for every query and should hash it once, not every time.
_VERIFIED: set[tuple[str, int, int, str]] = set()


# What to do about a damaged index file, in both vocabularies. build_index rewrites a damaged
# shard or curvature file by itself, but not a damaged manifest or projections file (they define
# the index): those need the index removed first, which the command's --overwrite does.
_REBUILD = (
    "build the index again on the same data (`headwater index build`, or build_index(..., path=...)), which "
    "rewrites damaged shards; if the projections or the manifest are damaged, pass --overwrite (from Python, "
    "delete the index directory first)"
)


def _check_file(path: Path, entry: dict, checksum: bool) -> None:
    """Raise CorruptIndexError naming ``path`` if it is missing, has the wrong size or checksum."""
    if not path.exists():
        raise CorruptIndexError(f"index file {path} is missing (the manifest lists it); {_REBUILD}")
    st = path.stat()
    if st.st_size != entry["bytes"]:
        raise CorruptIndexError(
            f"index file {path} is {st.st_size} bytes but the manifest records {entry['bytes']}: it is truncated "
            f"or was replaced; {_REBUILD}"
        )
    if checksum:
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, entry["sha256"])
        if key in _VERIFIED:
            return
        if _sha256_file(path) != entry["sha256"]:
            raise CorruptIndexError(
                f"index file {path} does not match its sha256 checksum in the manifest: it was altered or damaged; "
                f"{_REBUILD}"
            )
        _VERIFIED.add(key)


class GradientIndex:
    """An index directory opened for reading: manifest, memory-mapped shards, projections, curvature.

    ``open`` checks every shard's size against the manifest (cheap); ``verify()`` (or
    ``open(verify=True)``) also checks sha256 checksums, once per file and process.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.layers = [IndexLayer(**ly) for ly in manifest["layers"]]
        self.n_records: int = manifest["n_records"]
        self.record_dim: int = manifest["record_dim"]
        self.dtype: str = manifest["dtype"]
        self.shards: list[dict] = manifest["shards"]
        self._projections: dict | None = None
        self._curvature: dict | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> GradientIndex:
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(
                f"no index at {path} ({MANIFEST} is missing); build one with build_index(an, train, path=...)"
            )
        manifest = load_json(path / MANIFEST, hint=_REBUILD)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / MANIFEST} is not a headwater index of format version {FORMAT_VERSION} "
                f"(found format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
            )
        if not manifest.get("complete"):
            done = len(manifest.get("shards", []))
            raise ValueError(
                f"the index at {path} is incomplete ({done} of {manifest['n_shards']} shards, curvature "
                f"{'done' if manifest.get('curvature') else 'missing'}); run build_index with the same "
                "arguments again to resume it"
            )
        index = cls(path, manifest)
        covered = 0
        for entry in index.shards:
            if entry["start"] != covered:
                raise CorruptIndexError(
                    f"{path / MANIFEST} has a gap or overlap at record {covered}; rebuild the index"
                )
            covered = entry["stop"]
            _check_file(path / entry["file"], entry, checksum=verify)
        if covered != index.n_records:
            raise CorruptIndexError(f"{path / MANIFEST} covers {covered} of {index.n_records} records; rebuild it")
        if verify:
            index.verify()
        return index

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest; raise CorruptIndexError naming it."""
        for entry in self.shards:
            _check_file(self.path / entry["file"], entry, checksum=True)
        for side in (self.manifest["projection"], self.manifest.get("curvature") or {}):
            if side.get("file"):
                _check_file(self.path / side["file"], side, checksum=True)

    # ---- contents ----------------------------------------------------------------------
    def shard(self, j: int) -> torch.Tensor:
        """Shard j's records [n_j, D] in the storage dtype, memory-mapped (no copy)."""
        entry = self.shards[j]
        np_dtype, t_dtype = INDEX_DTYPES[self.dtype]
        n = entry["stop"] - entry["start"]
        # mode="c" (copy-on-write) gives a writable view without ever writing to the file,
        # which torch.from_numpy needs to avoid its read-only warning.
        arr = np.memmap(self.path / entry["file"], dtype=np_dtype, mode="c", shape=(n, self.record_dim))
        if not arr.dtype.isnative:  # big-endian host: one byte-swapped copy
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(arr)
        return t.view(t_dtype) if t.dtype != t_dtype else t

    def records(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Records ``start:stop`` as float32 [n, D], assembled across shards in dataset order."""
        stop = self.n_records if stop is None else stop
        parts = []
        for j, entry in enumerate(self.shards):
            lo, hi = max(start, entry["start"]), min(stop, entry["stop"])
            if lo < hi:
                parts.append(self.shard(j)[lo - entry["start"] : hi - entry["start"]].float())
        return torch.cat(parts) if parts else torch.zeros(0, self.record_dim)

    def projections(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._projections is None:
            tensors, _ = load_tensors(self.path / self.manifest["projection"]["file"])
            self._projections = {ly.name: (tensors[f"{ly.name}::out"], tensors[f"{ly.name}::in"]) for ly in self.layers}
        return self._projections

    def curvature(self) -> dict[str, LayerCurvature]:
        if self._curvature is None:
            entry = self.manifest["curvature"]
            tensors = load_tensors(self.path / entry["file"])[0] if entry.get("file") else {}
            self._curvature = _curvature_from_tensors(entry["kind"], self.layers, tensors)
        return self._curvature

    def scan(self, q: torch.Tensor, per_layer: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Scores of preconditioned projected queries q [Q, D] against every record: [Q, N].

        Shards are read through their memory maps a cache-sized block at a time: each block is
        converted to float32 into one reused buffer (no fresh allocation, so no page faults)
        and multiplied while it is still in cache. Results fill an [N, Q] matrix row-block by
        row-block and are transposed once at the end.
        """
        q_t = q.to("cpu", torch.float32).T.contiguous()  # [D, Q]
        n_q = q_t.shape[1]
        values = torch.zeros(self.n_records, n_q)
        layers = {ly.name: torch.empty(self.n_records, n_q) for ly in self.layers} if per_layer else None
        rows = max(64, _SCAN_BLOCK_BYTES // (4 * self.record_dim))
        buf = torch.empty(rows, self.record_dim) if self.dtype != "float32" else None
        for j, entry in enumerate(self.shards):
            r = self.shard(j)
            for i in range(0, r.shape[0], rows):
                block = r[i : i + rows]
                if buf is not None:
                    block = buf[: block.shape[0]].copy_(block)  # [n, D] float32
                lo, hi = entry["start"] + i, entry["start"] + i + block.shape[0]
                if layers is None:
                    torch.mm(block, q_t, out=values[lo:hi])
                    continue
                for ly in self.layers:
                    cols = slice(ly.offset, ly.offset + ly.size)
                    torch.mm(block[:, cols], q_t[cols], out=layers[ly.name][lo:hi])
                    values[lo:hi] += layers[ly.name][lo:hi]
        per = {n: v.T.contiguous() for n, v in layers.items()} if layers is not None else None
        return values.T.contiguous(), per


# ---------------------------------------------------------------------------------------
# Building an index
# ---------------------------------------------------------------------------------------


def _index_path(an: Any, path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    if getattr(an, "workdir", None) is not None:
        return an.workdir.path / "index"
    raise ValueError(
        "the index needs a directory: pass path=..., or create the Attributor with workdir=... "
        "(the index then lives in <workdir>/index)"
    )


def _encode(buf: torch.Tensor, dtype: str, name: str) -> bytes:
    """float32 records [n, D] -> the raw little-endian bytes of a shard file."""
    np_dtype, t_dtype = INDEX_DTYPES[dtype]
    t = buf.to(t_dtype)
    if not torch.isfinite(t).all():
        raise ValueError(
            f"projected gradients for {name} do not fit in {dtype} (largest magnitude "
            f"{buf.abs().max().item():.3g}); rebuild with dtype='bfloat16' or dtype='float32'"
        )
    arr = (t.view(torch.int16) if dtype == "bfloat16" else t).numpy()
    return arr.astype(np.dtype(np_dtype), copy=False).tobytes()


def _write_shard(path: Path, data: bytes, start: int, stop: int) -> dict:
    """Write one shard atomically and return its manifest entry."""
    atomic_write_bytes(path, data)
    return {
        "file": path.name,
        "start": start,
        "stop": stop,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _record_pass(
    an: Any, data: _Slice, batch_size: int, projector: Projected, layout: list[IndexLayer]
) -> torch.Tensor:
    """Projected training gradients of ``data`` as float32 records [n, D], in dataset order."""
    records = _Records(len(data), layout, projector)
    name = f"training data[{data.start}:{data.stop}]"
    an.run(data, records, an.training_loss, "index records", batch_size, name=name, shard=False)
    return records.buf


def _entry(side: dict) -> dict:
    """A shard's manifest entry from its sidecar (without the sidecar's own checksum)."""
    return {k: v for k, v in side.items() if k != "checksum"}


def _done_shards(path: Path, manifest: dict, mine: set[int]) -> dict[int, dict]:
    """Shards (of those in ``mine``) already on disk and intact: manifest entries and rank sidecars."""
    entries = {e["start"]: e for e in manifest["shards"]}
    for side in path.glob("shard-*.entry.json"):
        e = _entry(load_json(side))
        entries.setdefault(e["start"], e)
    out = {}
    for e in entries.values():
        j = e["start"] // manifest["shard_size"]
        if j not in mine:
            continue
        try:
            _check_file(path / e["file"], e, checksum=True)
        except CorruptIndexError:
            continue  # rebuilt below
        out[j] = e
    return out


def _prepare(path: Path, config: dict, overwrite: bool, projections: Any) -> None:
    """Create or validate the index directory; write the initial manifest and the projections."""
    path.mkdir(parents=True, exist_ok=True)
    manifest_path = path / MANIFEST
    if manifest_path.exists():
        old = load_json(manifest_path)
        old_proj = old.get("projection") or {}
        old = {**old, "projection": {k: old_proj.get(k) for k in config["projection"]}}
        diff = [k for k in config if old.get(k) != config[k]]
        if not diff:
            _check_file(path / old_proj["file"], old_proj, checksum=True)
            return
        if not overwrite:
            k = diff[0]
            also = f" (also differs: {', '.join(diff[1:])})" if len(diff) > 1 else ""
            raise ValueError(
                f"the index at {path} was built with {k}={_short(old.get(k))} but this build has "
                f"{k}={_short(config[k])}{also}; use another path, or pass overwrite=True to replace it"
            )
        for e in old.get("shards", []):
            (path / e["file"]).unlink(missing_ok=True)
        for f in (*path.glob("shard-*"), path / CURVATURE_FILE, path / PROJECTIONS_FILE):
            f.unlink(missing_ok=True)
    tensors = {}
    for name, (p_out, p_in) in projections().items():
        tensors[f"{name}::out"], tensors[f"{name}::in"] = p_out, p_in
    save_tensors(path / PROJECTIONS_FILE, tensors, {"kind": config["projection"]["kind"]})
    proj_file = path / PROJECTIONS_FILE
    projection = {
        **config["projection"],
        "file": PROJECTIONS_FILE,
        "bytes": proj_file.stat().st_size,
        "sha256": _sha256_file(proj_file),
    }
    save_json(
        manifest_path,
        {
            **config,
            "projection": projection,
            "headwater": __version__,
            "shards": [],
            "curvature": None,
            "complete": False,
        },
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _build_records(
    an: Any,
    train: Any,
    path: Path,
    manifest: dict,
    projector: Projected,
    layout: list[IndexLayer],
    shard_size: int,
    batch_size: int,
    dtype: str,
) -> None:
    """The record shards: shard j on rank j % world; each written atomically, progress in the manifest."""
    rank, world = rank_world()
    n = len(train)
    n_shards = (n + shard_size - 1) // shard_size
    mine = {j for j in range(n_shards) if j % world == rank}
    done = _done_shards(path, manifest, mine)
    for j in sorted(mine - set(done)):
        start, stop = j * shard_size, min(n, (j + 1) * shard_size)
        buf = _record_pass(an, _Slice(train, start, stop), batch_size, projector, layout)
        file = path / f"shard-{j:05d}.bin"
        entry = _write_shard(file, _encode(buf, dtype, file.name), start, stop)
        done[j] = entry
        if world == 1:  # the manifest is the progress record
            manifest["shards"] = sorted(done.values(), key=lambda e: e["start"])
            save_json(path / MANIFEST, manifest)
        else:  # ranks must not race on one file: a sidecar per shard, merged by rank 0
            save_json(path / f"shard-{j:05d}.entry.json", entry)
    barrier()
    if rank == 0 and world > 1:
        entries = {e["start"]: e for e in manifest["shards"]}
        sidecars = sorted(path.glob("shard-*.entry.json"))
        for side in sidecars:
            e = _entry(load_json(side))
            entries[e["start"]] = e
        manifest["shards"] = sorted(entries.values(), key=lambda e: e["start"])
        save_json(path / MANIFEST, manifest)
        for side in sidecars:
            side.unlink()
    barrier()


def _build_curvature(
    an: Any, cdata: Any, path: Path, projections: dict, layout: list[IndexLayer], curvature: str, batch_size: int
) -> None:
    """The projected curvature (unless an intact one is on disk), then the manifest marked complete."""
    rank, _ = rank_world()
    manifest = load_json(path / MANIFEST)
    entry = manifest.get("curvature")
    if entry is not None and entry.get("file"):
        try:
            _check_file(path / entry["file"], entry, checksum=True)
        except CorruptIndexError:
            entry = None
    if entry is None:
        curv = _fit_projected_curvature(an, cdata, batch_size, projections, layout, curvature)
        if rank == 0:
            entry = {"kind": curvature}
            tensors = {f"{ly.name}::{k}": v for ly in layout for k, v in curv[ly.name].tensors().items()}
            if tensors:
                save_tensors(path / CURVATURE_FILE, tensors, {"kind": curvature})
                entry.update(
                    file=CURVATURE_FILE,
                    bytes=(path / CURVATURE_FILE).stat().st_size,
                    sha256=_sha256_file(path / CURVATURE_FILE),
                )
            manifest["curvature"] = entry
    if rank == 0:
        manifest["complete"] = True
        save_json(path / MANIFEST, manifest)
    barrier()


def build_index(
    attributor: Any,
    train: Any,
    dim: int = DEFAULT_DIM,
    batch_size: int = 8,
    path: str | Path | None = None,
    projection: str = "gaussian",
    dtype: str = "float16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    curvature: str = "auto",
    curvature_data: Any = None,
    seed: int | None = None,
    overwrite: bool = False,
) -> GradientIndex:
    """Write one projected-gradient record per training sequence, then fit the projected curvature.

    Parameters
    ----------
    attributor : Attributor
        Supplies the model, task, tracked layers, ``fisher`` and ``seed``. It must be fitted
        for ``projection="kfac"`` and ``curvature="engine"`` (which "auto" picks when it is).
    train : dataset
        Records follow its order: score column j is example j.
    dim : int
        Projection size per side and layer: ``k_in = min(dim, I)``, ``k_out = min(dim, O)``.
    path : path or None
        The index directory; default ``<attributor.workdir>/index``.
    projection : {"gaussian", "rademacher", "orthogonal", "kfac"}
    dtype : {"float16", "bfloat16", "float32"}
        Storage precision of the records (curvature and projections stay float64).
    shard_size : int
        Records per shard file: the unit of resumption and of work per rank.
    curvature : {"auto", "engine", "ekfac", "kfac", "dense", "identity"}
        Preconditioner in the projected space (see the module docstring). "auto" is "engine"
        for a fitted K-FAC/EK-FAC/diagonal attributor while every layer has at most 4096
        projected coordinates (no pass over data), else "ekfac" (two passes).
    curvature_data : dataset or None
        Data for the curvature pass(es); default ``train``. A subset makes the build cheaper.
    seed : int or None
        Seeds random projections; default the attributor's seed.
    overwrite : bool
        Replace an index at ``path`` that was built with other settings or data.

    Resuming: the manifest is rewritten after every shard. Calling ``build_index`` again with
    the same arguments checks the finished shards (size and sha256), rebuilds missing or
    damaged ones, and produces the same bytes as an uninterrupted build. Under
    ``torch.distributed`` rank r builds shards r, r + world, ...; rank 0 writes the manifest.
    """
    an = attributor
    train = check_data(train, "training data")
    batch_size = check_int(batch_size, "batch_size")
    dim = check_int(dim, "dim")
    shard_size = check_int(shard_size, "shard_size")
    projection = check_choice(projection, "projection", PROJECTIONS)
    dtype = check_choice(dtype, "dtype", tuple(INDEX_DTYPES))
    curvature = check_choice(curvature, "curvature", INDEX_CURVATURES)
    seed = an.seed if seed is None else seed
    check_seed(seed, allow_none=True)
    cdata = train if curvature_data is None else check_data(curvature_data, "curvature_data")
    path = _index_path(an, path)
    layout = layout_for(an.layers, dim)
    if curvature == "auto":
        fitted = an.curvature is not None and all(
            isinstance(op, (EigenCurvature, DiagonalCurvature)) for op in an.curvature.values()
        )
        curvature = "engine" if fitted and max(ly.size for ly in layout) <= DENSE_MAX else "ekfac"
    elif curvature in ("dense", "engine") and max(ly.size for ly in layout) > DENSE_MAX:
        big = max(layout, key=lambda ly: ly.size)
        raise ValueError(
            f"curvature={curvature!r} needs k_out*k_in <= {DENSE_MAX} per layer, but layer {big.name!r} has "
            f"{big.k_out}x{big.k_in}; lower dim or use curvature='ekfac'"
        )
    n = len(train)
    n_shards = (n + shard_size - 1) // shard_size
    train_fp = fingerprint(train)
    config = {  # what must match for a resume; the first difference is reported, so user choices come first
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(an.model),
        "data_fingerprint": train_fp,
        "projection": {"kind": projection, "seed": seed, "dim": dim},
        "dtype": dtype,
        "shard_size": shard_size,
        "curvature_kind": curvature,
        "curvature_data_fingerprint": (
            an.fit_fingerprint if curvature == "engine" else train_fp if curvature_data is None else fingerprint(cdata)
        ),
        "task": type(an.task).__name__,
        "fisher": an.fisher,
        "layers": [ly.as_json() for ly in layout],
        "n_records": n,
        "record_dim": layout[-1].offset + layout[-1].size,
        "n_shards": n_shards,
        "byte_order": "little",
    }
    rank, world = rank_world()
    if rank == 0:
        _prepare(path, config, overwrite, lambda: make_projections(an, layout, projection, seed))
    barrier()
    manifest = load_json(path / MANIFEST)
    tensors, _ = load_tensors(path / PROJECTIONS_FILE)
    projections = {ly.name: (tensors[f"{ly.name}::out"], tensors[f"{ly.name}::in"]) for ly in layout}
    projector = Projected(None, projections)

    _build_records(an, train, path, manifest, projector, layout, shard_size, batch_size, dtype)
    _build_curvature(an, cdata, path, projections, layout, curvature, batch_size)
    return GradientIndex.open(path)


# ---------------------------------------------------------------------------------------
# Querying
# ---------------------------------------------------------------------------------------


def _open(an: Any, index: str | Path | GradientIndex | None, verify: bool) -> GradientIndex:
    if isinstance(index, GradientIndex):
        return index
    return GradientIndex.open(_index_path(an, index), verify=verify)


def query_gradients(
    attributor: Any,
    queries: Any,
    index: GradientIndex,
    batch_size: int = 8,
    damping: float | None = None,
    response: Inverse | None = None,
) -> torch.Tensor:
    """Preconditioned projected query gradients ``(G_p + lambda I)^-1 r_q``, float64 [Q, D].

    Raises ValueError when the attributor's model or tracked layers are not the ones the
    index was built for: its records would be meaningless against these queries.
    """
    an = attributor
    queries = check_data(queries, "queries")
    batch_size = check_int(batch_size, "batch_size")
    fp = model_fingerprint(an.model)
    if index.manifest["model_fingerprint"] != fp:
        raise ValueError(
            f"the index at {index.path} was built for another model (fingerprint "
            f"{index.manifest['model_fingerprint']}, this model {fp}); rebuild it with build_index"
        )
    names = [ly.name for ly in index.layers]
    if names != list(an.layers):
        raise ValueError(
            f"the index at {index.path} tracks layers {names[:4]}{'...' if len(names) > 4 else ''} but this "
            f"Attributor tracks {list(an.layers)[:4]}; create the Attributor with the same modules"
        )
    curvature = index.curvature()
    lam = resolve_damping(curvature, damping)
    consumer = _ProjectedQueries(Projected(None, index.projections()), curvature, lam, response or INVERSE)
    an.run(queries, consumer, an.measurement, "index query gradients", batch_size, name="queries", shard=False)
    parts = consumer.parts
    return torch.cat([torch.cat(parts[n]) for n in names], dim=1)


def query_index(
    attributor: Any,
    queries: Any,
    index_path: str | Path | GradientIndex | None = None,
    top_k: int | None = None,
    batch_size: int = 8,
    damping: float | None = None,
    per_layer: bool = False,
    verify: bool = True,
    use_faiss: bool = False,
    response: Inverse | None = None,
) -> Scores:
    """Influence of every indexed training sequence on every query, from the index alone.

    Returns ``Scores`` with values [Q, N] (and per_layer if asked), like ``Attributor.scores``;
    ``top_k`` also stores the top-k in ``meta["top"]`` (indices and scores as lists).
    ``damping`` is per layer in the projected space: None applies 0.1 x the mean eigenvalue of
    the projected curvature. ``verify`` checks shard checksums (once per process and file).

    ``use_faiss`` answers ``top_k`` with a FAISS inner-product index over the records
    (``pip install faiss-cpu``) instead of a full scan; only the top-k entries of ``values``
    are filled, the rest are -inf.
    """
    index = _open(attributor, index_path, verify)
    if top_k is not None:
        top_k = check_int(top_k, "top_k")
    q = query_gradients(attributor, queries, index, batch_size, damping, response)
    meta = {
        "index": str(index.path),
        "projection": index.manifest["projection"]["kind"],
        "dim": index.manifest["projection"]["dim"],
        "curvature": index.manifest["curvature"]["kind"],
        "damping": resolve_damping(index.curvature(), damping),
    }
    if use_faiss:
        if top_k is None or per_layer:
            raise ValueError("use_faiss=True answers top-k only: pass top_k=..., and per_layer=False")
        values = _faiss_scores(index, q, top_k)
        per_layer_values = None
    else:
        values, per_layer_values = index.scan(q, per_layer)
    res = Scores(values, per_layer_values, None, meta)
    if top_k is not None:
        top = res.top(top_k)
        meta["top"] = {"k": top_k, "indices": top.indices.tolist(), "scores": top.values.tolist()}
    return res


# ---------------------------------------------------------------------------------------
# Optional FAISS search
# ---------------------------------------------------------------------------------------

# Below this many records FAISS gets an exact flat inner-product index; above it an inverted
# file (k-means cells, float16 scalar-quantized vectors) that probes FAISS_NPROBE cells per
# query, which is what makes indexes too large to scan searchable. IVF results are approximate.
FAISS_IVF_MIN = 50_000
FAISS_NPROBE = 32


def _faiss_spec(n: int) -> str:
    """The FAISS index_factory string for n records: Flat, or IVF with ~4 sqrt(n) cells.

    FAISS wants at least 39 training points per cell, hence the cap at n // 39.
    """
    if n < FAISS_IVF_MIN:
        return "Flat"
    return f"IVF{max(1, min(int(4 * math.sqrt(n)), n // 39))},SQfp16"


def _faiss_index(index: GradientIndex, faiss: Any) -> Any:
    """Build (once, saved next to the shards with FAISS's own writer) or load the FAISS index."""
    spec = _faiss_spec(index.n_records)
    key = hashlib.sha256(repr((index.shards, spec)).encode()).hexdigest()[:16]
    file = index.path / f"faiss-{key}.index"
    if file.exists():
        return faiss.read_index(str(file))
    fidx = faiss.index_factory(index.record_dim, spec, faiss.METRIC_INNER_PRODUCT)
    if not fidx.is_trained:  # k-means on a strided sample of at most 256 records per cell
        step = max(1, index.n_records // (256 * faiss.extract_index_ivf(fidx).nlist))
        fidx.train(np.ascontiguousarray(index.records()[::step].numpy()))
    for j in range(len(index.shards)):
        fidx.add(np.ascontiguousarray(index.shard(j).float().numpy()))
    tmp = file.with_name(f".{file.name}.part")
    faiss.write_index(fidx, str(tmp))
    os.replace(tmp, file)
    return fidx


def _faiss_scores(index: GradientIndex, q: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k inner products through FAISS, as a [Q, N] tensor that is -inf off the top-k."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("use_faiss=True needs FAISS: pip install faiss-cpu (or faiss-gpu)") from e
    fidx = _faiss_index(index, faiss)
    if _faiss_spec(index.n_records).startswith("IVF"):
        faiss.extract_index_ivf(fidx).nprobe = FAISS_NPROBE
    k = min(top_k, index.n_records)
    sims, ids = fidx.search(np.ascontiguousarray(q.to(torch.float32).numpy()), k)
    values = torch.full((q.shape[0], index.n_records), -math.inf)
    found = ids >= 0  # IVF may return fewer than k hits (-1) when the probed cells are small
    rows = np.nonzero(found)[0]
    values[torch.from_numpy(rows), torch.from_numpy(ids[found]).long()] = torch.from_numpy(sims[found])
    return values
