"""Every attribution method the evaluation compares, behind one call: ``run_method``.

All methods score the same trained model, data and queries, with the same absolute damping
lambda (``reference_damping``), so the differences come from how each approximates
``(G + lambda I)^-1`` and nothing else:

- ``identity``, ``diagonal``, ``kfac``, ``ekfac``: headwater's strategies with its default
  Fisher estimate (``fisher="auto"``: the signed top-k estimator, one backward pass),
  block-diagonal over layers.
- ``ekfac-sampled``: EK-FAC with the paper's single sampled label per token
  (``fisher="sampled"``), to compare estimators at equal cost.
- ``ekfac-exact``: headwater's EK-FAC with ``fisher="exact"`` (the expectation over labels,
  one backward pass per class), for tasks that define ``gauss_newton_losses``.
- ``lissa``: the LiSSA recursion over all tracked parameters (``evaluate.lissa``).
- ``exact``: the dense damped Gauss-Newton inverse over all tracked parameters, for small
  models only; the quantity PBRF agrees with to first order.
- ``kronfluence``: kronfluence's EK-FAC (``pip install headwater[peers]``), with its own
  sampled labels. ``damping=None`` gives it its own heuristic (0.1 x mean Lambda per module).

Sampled-Fisher methods depend on the label draw, so ``run_method`` takes a seed and the
benchmark reports the spread over several.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import conv1d_to_linear
from ..attributor import Attributor
from ..curvature import DAMPING_SCALE, EigenCurvature
from ..gauss_newton import ParameterSpace, dense_gauss_newton, layer_gradients, stream_scores
from .lissa import LiSSA
from .trainers import Benchmark

__all__ = [
    "METHODS",
    "MethodResult",
    "LiSSASettings",
    "reference_damping",
    "run_method",
    "kronfluence_available",
    "kronfluence_scores",
]

METHODS = ("identity", "diagonal", "kfac", "ekfac", "ekfac-sampled", "ekfac-exact", "lissa", "exact", "kronfluence")

# Above this many tracked parameters the dense [P, P] Gauss-Newton is not worth forming.
EXACT_MAX_PARAMETERS = 6000


@dataclass
class LiSSASettings:
    """LiSSA's knobs; ``scale=None`` estimates it (see ``evaluate.lissa``).

    seeds: how many minibatch orders a ``Suite`` runs (None: the suite's ``fit_seeds``). LiSSA
    costs Q x depth Gauss-Newton products, so on the LM one order is all the budget allows.
    """

    depth: int = 2000
    repeats: int = 1
    batch_size: int = 64
    scale: float | None = None
    seeds: int | None = None


@dataclass
class MethodResult:
    """Scores [Q, N] of one method and the wall time of its fit + score."""

    method: str
    values: torch.Tensor
    seconds: float
    meta: dict = field(default_factory=dict)


def reference_damping(bench: Benchmark, seed: int = 0) -> float:
    """One absolute lambda for every method: 0.1 x the mean eigenvalue of G over all tracked parameters.

    This is the paper's per-layer rule applied to the whole model: the mean eigenvalue is
    trace(G) / P, and EK-FAC's corrected eigenvalues sum to each layer's trace(G), so we read it
    off a (sampled-Fisher) EK-FAC fit. A single value is needed because LiSSA, PBRF and the
    dense reference have no layer structure.
    """
    an = Attributor(bench.model, task=bench.task, strategy="ekfac", modules=bench.modules, seed=seed)
    an.fit(bench.train, bench.batch_size)
    ops = [op for op in an.curvature.values() if isinstance(op, EigenCurvature)]
    return DAMPING_SCALE * float(sum(op.lam.sum() for op in ops)) / sum(op.lam.numel() for op in ops)


def kronfluence_available() -> bool:
    try:
        import kronfluence  # noqa: F401
    except Exception:
        return False
    return True


def run_method(
    bench: Benchmark, method: str, damping: float, seed: int = 0, lissa: LiSSASettings | None = None
) -> MethodResult:
    """Fit (if needed) and score ``bench.queries`` against ``bench.train`` with one method."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; choose one of {METHODS}")
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"damping": damping, "seed": seed}
    if method in ("identity", "diagonal", "kfac", "ekfac", "ekfac-sampled", "ekfac-exact"):
        strategy, fisher, samples = {
            "ekfac-exact": ("ekfac", "exact", 1),
            "ekfac-sampled": ("ekfac", "sampled", 1),
        }.get(method, (method, "auto", 1))
        an = Attributor(
            bench.model,
            task=bench.task,
            strategy=strategy,
            fisher=fisher,
            samples=samples,
            modules=bench.modules,
            seed=seed,
        )
        an.fit(bench.train, bench.batch_size)
        values = an.scores(bench.queries, bench.train, bench.batch_size, damping=damping).values
    elif method == "lissa":
        s = lissa or LiSSASettings()
        ls = LiSSA(bench.model, bench.task, bench.modules, damping, s.scale, s.depth, s.repeats, s.batch_size, seed)
        values = ls.scores(bench.queries, bench.train, bench.batch_size).values
        meta.update(depth=s.depth, repeats=s.repeats, batch_size=s.batch_size, scale=ls.scale_used)
    elif method == "exact":
        values = _exact_scores(bench, damping)
    else:
        values = _kronfluence_scores(bench, damping, seed)
    return MethodResult(method, values.double().cpu(), time.perf_counter() - t0, meta)


def _exact_scores(bench: Benchmark, damping: float) -> torch.Tensor:
    an = Attributor(bench.model, task=bench.task, strategy="identity", modules=bench.modules)
    space = ParameterSpace(bench.model, an.layers)
    if space.size > EXACT_MAX_PARAMETERS:
        raise ValueError(
            f"method 'exact' forms a dense {space.size}x{space.size} Gauss-Newton matrix; it is limited to "
            f"{EXACT_MAX_PARAMETERS} tracked parameters. Use it on the MLP tasks, or track fewer modules"
        )
    g = dense_gauss_newton(bench.model, bench.task, space, bench.train, bench.batch_size)
    gq = space.flatten(layer_gradients(bench.model, bench.task, an.layers, bench.queries, bench.batch_size, True))
    p = torch.linalg.solve(g + damping * torch.eye(space.size, dtype=torch.float64), gq.double().T).T
    return stream_scores(bench.model, bench.task, an.layers, space.unflatten(p), bench.train, bench.batch_size)


def _kronfluence_scores(bench: Benchmark, damping: float | None, seed: int) -> torch.Tensor:
    """kronfluence 1.0.1's EK-FAC with the same task functions, data, tracked modules and damping."""
    return kronfluence_scores(bench, [damping], seed)[0]


def kronfluence_scores(bench: Benchmark, dampings: list[float | None], seed: int) -> list[torch.Tensor]:
    """kronfluence's EK-FAC fitted once (pseudo-labels seeded by ``seed``), scored per damping.

    A damping of None is kronfluence's heuristic, 0.1 x mean Lambda per module (its
    ``ScoreArguments`` default is a fixed 1e-8).
    """
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KfTask
        from kronfluence.utils.dataset import DataLoaderKwargs
    except Exception as e:
        raise ImportError(
            f"method 'kronfluence' needs kronfluence ({type(e).__name__}: {e}); pip install 'headwater[peers]'"
        ) from e
    task = bench.task
    names = list(Attributor(bench.model, task=task, strategy="identity", modules=bench.modules).layers)

    class Adapter(KfTask):
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
            return task.loss(model, batch, sample=sample)

        def compute_measurement(self, batch: Any, model: Any) -> torch.Tensor:
            return task.measurement(model, batch)

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: Any) -> Any:
            return batch.get("attention_mask") if isinstance(batch, dict) else None

    model = prepare_model(conv1d_to_linear(copy.deepcopy(bench.model)).eval(), Adapter())
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)  # kronfluence draws its pseudo-labels from the global generator
        az = Analyzer(
            "accuracy", model, Adapter(), cpu=True, disable_tqdm=True, output_dir=tmp, log_level=logging.WARNING
        )
        az.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=task.collate, num_workers=0))
        fargs = FactorArguments(strategy="ekfac")
        az.fit_all_factors("f", bench.train, per_device_batch_size=bench.batch_size, factor_args=fargs)
        out = []
        for i, damping in enumerate(dampings):
            az.compute_pairwise_scores(
                f"s{i}",
                "f",
                bench.queries,
                bench.train,
                per_device_query_batch_size=bench.batch_size,
                per_device_train_batch_size=bench.batch_size,
                score_args=ScoreArguments(damping_factor=damping),
            )
            out.append(az.load_pairwise_scores(f"s{i}")["all_modules"].clone())
        return out
