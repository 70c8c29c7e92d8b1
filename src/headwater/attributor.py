"""The ``Attributor``: fit curvature once, then score queries against training data.

Data path (one look)::

    data --iter_batches--> batch --task / fisher pseudo-losses--> Capture --(a, g, mask)--> consumer
        fit:    CovarianceAccumulator -> eigh -> LambdaAccumulator       (engine.run_pass x 2)
        scores: QueryGradientConsumer (queries), ScoreAccumulator (training data)
        self-influence: SelfInfluenceAccumulator

Example::

    an = hw.Attributor(model, task=hw.LanguageModelingTask(), modules="mlp", workdir="runs/a")
    an.fit(train, batch_size=8)
    res = an.scores(queries, train, batch_size=8, query_rank=32)
    res.top(5)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .curvature import (
    INVERSE,
    IdentityCurvature,
    Inverse,
    LayerCurvature,
    curvature_from_tensors,
    fit_curvature,
    get_strategy,
    resolve_damping,
    warn_zero_curvature,
)
from .data import check_data, fingerprint, sample_examples
from .distributed import barrier, is_main
from .engine import Consumer, model_device, run_pass, spec_key
from .errors import NotFittedError
from .fisher import DEFAULT_TOP, FISHERS, pseudo_losses, resolve_fisher
from .index import DEFAULT_DIM, build_index, query_index
from .layers import select_layers
from .plan import plan_run
from .ranking import RankingAccumulator
from .refine import check_refine, refined_query_gradients
from .scoring import QueryGradientConsumer, QueryGradients, ScoreAccumulator, Scores, SelfInfluenceAccumulator
from .storage import SCHEMA_VERSION, load_tensors, model_fingerprint, save_tensors
from .task import LanguageModelingTask, Task
from .validation import check_choice, check_int, check_seed
from .workdir import Workdir

__all__ = ["Attributor", "Settings", "NotFittedError", "STRATEGIES", "FISHERS"]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


@dataclass(frozen=True)
class Settings:
    """An Attributor's validated choices (see ``Attributor`` for what each means)."""

    strategy: str = "ekfac"
    fisher: str = "auto"
    samples: int = 1  # pseudo-loss backward passes per batch, averaged
    top: int = DEFAULT_TOP  # labels per token that "topk" takes exactly
    seed: int = 0
    checkpoint_every: int | None = 50  # batches per rank between checkpoints (None: off)
    progress: bool = False

    @classmethod
    def validate(cls, model: Any, task: Any, **kw: Any) -> Settings:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(
                f"task must be a headwater Task (e.g. hw.LanguageModelingTask()), got {type(task).__name__}"
            )
        s = cls(**kw)
        check_choice(s.strategy, "strategy", STRATEGIES)
        check_choice(s.fisher, "fisher", FISHERS)
        check_seed(s.seed)
        check_int(s.samples, "samples")
        check_int(s.top, "top")
        check_int(s.checkpoint_every, "checkpoint_every", allow_none=True)
        fisher = resolve_fisher(task, s.fisher)
        if s.samples != 1 and fisher not in ("sampled", "topk", "importance"):
            raise ValueError(
                f"samples={s.samples} draws pseudo-labels, but fisher={fisher!r} draws none; "
                "use fisher='topk', 'importance' or 'sampled', or leave samples=1"
            )
        return cls(**{**asdict(s), "fisher": fisher})


def workdir_config(model: nn.Module, task: Task, s: Settings, layers: dict) -> dict:
    """What a workdir records and checks (``Workdir.open``): the model, task, settings and layers."""
    return {
        "schema": SCHEMA_VERSION,
        "headwater": __version__,
        "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model)},
        "model_path": _local_path(model),
        "task": {"class": type(task).__name__, "fingerprint": task.fingerprint()},
        "strategy": s.strategy,
        "fisher": s.fisher,
        "samples": s.samples,
        "top": s.top if s.fisher == "topk" else None,
        "seed": s.seed,
        "modules": {n: [ad.kind, ad.out_features, ad.in_features] for n, ad in layers.items()},
        "layers": list(layers),  # model order (JSON objects are written with sorted keys)
    }


class Attributor:
    """Influence functions with an EK-FAC (or K-FAC, diagonal, identity) Gauss-Newton.

    ``model``: a HF causal LM or any PyTorch model (its ``nn.Linear`` and HF ``Conv1D`` layers are
    tracked; each pass runs in eval mode). ``task``: loss, measurement and scored tokens (default
    ``LanguageModelingTask()``). ``modules``: None (every supported layer), "mlp" or names.
    ``workdir``: where factors, checkpoints and cached scores persist (None: in memory). The other
    arguments are ``Settings`` (``strategy``, ``fisher``: see ``headwater.fisher``, resolved in
    ``an.fisher``; ``samples``, ``top``, ``seed``, ``progress``, ``checkpoint_every``).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        strategy: str = "ekfac",
        modules: None | str | list[str] = None,
        fisher: str = "auto",
        samples: int = 1,
        top: int = DEFAULT_TOP,
        workdir: str | Path | None = None,
        seed: int = 0,
        progress: bool = False,
        checkpoint_every: int | None = 50,
    ):
        task = LanguageModelingTask() if task is None else task
        given = dict(strategy=strategy, fisher=fisher, samples=samples, top=top, seed=seed, progress=progress)
        self.settings = Settings.validate(model, task, checkpoint_every=checkpoint_every, **given)
        self.model, self.task = model, task
        self.layers = select_layers(model, modules)
        self.shapes = {n: (ad.out_features, ad.in_features) for n, ad in self.layers.items()}
        self.curvature: dict[str, LayerCurvature] | None = None
        self.fit_fingerprint = self.factors_checksum = self.fitted_at = None  # set by fit or the workdir
        self.config = workdir_config(model, task, self.settings, self.layers)
        s = self.settings
        if s.strategy == "identity":
            self.curvature = {n: IdentityCurvature(shape) for n, shape in self.shapes.items()}
        self.workdir = Workdir(workdir) if workdir is not None else None
        if self.workdir is not None:
            self.workdir.open(self.config)
            saved = _saved_curvature(self.workdir, self.strategy, self.shapes)
            if saved is not None:
                self.curvature, self.factors_checksum, self.fit_fingerprint, self.fitted_at = saved

    # the settings, by name (read-only)
    strategy = property(lambda self: self.settings.strategy)
    fisher = property(lambda self: self.settings.fisher)
    samples = property(lambda self: self.settings.samples)
    top = property(lambda self: self.settings.top)
    seed = property(lambda self: self.settings.seed)
    progress = property(lambda self: self.settings.progress)
    device = property(lambda self: model_device(self.model))

    # ------------------------------------------------------------------ the passes
    def fit_losses(self, batch: Any) -> list[torch.Tensor]:
        """The pseudo-losses whose gradients estimate G, for this Attributor's ``fisher``."""
        return pseudo_losses(self.task, self.model, batch, self.fisher, self.samples, self.top)

    def training_loss(self, batch: Any) -> list[torch.Tensor]:
        return [self.task.loss(self.model, batch, sample=False)]

    def measurement(self, batch: Any) -> list[torch.Tensor]:
        return [self.task.measurement(self.model, batch)]

    def run(self, data: Any, consumer: Consumer, losses: Any, phase: str, batch_size: int, **kw: Any) -> Consumer:
        """``engine.run_pass`` over ``data`` with this Attributor's model, task, layers, seed and progress."""
        opts = dict(losses=losses, batch_size=batch_size, phase=phase, seed=self.seed, progress=self.progress)
        return run_pass(self.model, self.task, self.layers, data, consumer, **opts, **kw)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: Any,
        batch_size: int = 8,
        overwrite: bool = False,
        keep_covariance: bool = False,
        max_examples: int | None = None,
    ) -> Attributor:
        """Estimate the curvature: the passes of ``curvature.fit_curvature`` over ``data``.

        With a workdir the factors are saved and reused (a second ``fit`` on the same data loads
        them), a crash resumes from the last checkpoint, refitting removes every result derived
        from the old factors, and the covariance sums are removed unless ``keep_covariance``.
        ``max_examples=N`` fits on a seeded random subset of N examples (large corpora: the
        factors need far fewer sequences than scoring does).
        """
        data, batch_size = check_data(data, "training data"), check_int(batch_size, "batch_size")
        data = sample_examples(data, check_int(max_examples, "max_examples", allow_none=True), self.seed)
        strategy = get_strategy(self.strategy)
        if not strategy.requires_fit:
            return self
        fp = fingerprint(data)
        if self.curvature is not None and not overwrite:
            if self.fit_fingerprint == fp:
                return self
            raise ValueError(
                f"workdir {self.workdir.path if self.workdir else ''} already holds factors fitted on other "
                f"data (fingerprint {self.fit_fingerprint}, this data {fp}); pass overwrite=True to refit, "
                "or use a new workdir"
            )
        dtype = str(next(self.model.parameters()).dtype)  # fp32 and bf16 weights share a fingerprint
        spec = {"fit_data": fp, "batch_size": batch_size, "config": spec_key(self.config), "dtype": dtype}
        curvature = fit_curvature(self, strategy, data, batch_size, spec, overwrite)
        warn_zero_curvature(curvature)
        self.curvature, self.fit_fingerprint, self.fitted_at = curvature, fp, _now()
        if self.workdir is not None:
            tensors = {f"{n}::{k}": v for n, op in curvature.items() for k, v in op.tensors().items()}
            meta = {"fit_data": fp, "created": self.fitted_at, "batch_size": batch_size, **self.config}
            self.factors_checksum = self.workdir.record_fit(self.config, tensors, meta, keep_covariance)
        return self

    # ------------------------------------------------------------------ scores
    def _require_fitted(self) -> dict[str, LayerCurvature]:
        if self.curvature is None:
            raise NotFittedError(
                f"this Attributor (strategy={self.strategy!r}) is not fitted yet; call "
                "an.fit(train) first, or open a workdir that holds factors"
            )
        return self.curvature

    def damping(self, damping: float | str | None = None) -> dict[str, float]:
        """Per-layer damping: the paper's 0.1 x mean eigenvalue (floored where it is 0), an absolute value,
        or "calibrate": the choice ``headwater.training.calibrate_damping`` cached in the workdir."""
        if damping == "calibrate":
            if self.workdir is None:
                raise ValueError('damping="calibrate" reads the calibration from the workdir; create it with workdir=')
            return self.workdir.calibrated_damping(self.factors_checksum, list(self.layers))
        return resolve_damping(self._require_fitted(), damping)

    def query_gradients(
        self,
        queries: Any,
        batch_size: int = 8,
        damping: float | None = None,
        query_rank: int | None = None,
        refine_steps: int = 0,
        refine_data: Any = None,
        refine_blocks: str = "full",
        response: Inverse | None = None,
    ) -> dict[str, QueryGradients]:
        """Preconditioned query gradients (G + lambda I)^-1 grad f_q per layer (low-rank with ``query_rank``).

        Every rank computes all of them. ``refine_steps=n``: n PCG steps toward the exact damped
        Gauss-Newton over ``refine_data`` (``headwater.refine``; n + 1 passes, full gradients in
        memory). ``response``: another spectral function of the eigenvalues (``curvature.Inverse``).
        """
        queries, batch_size = check_data(queries, "queries"), check_int(batch_size, "batch_size")
        query_rank = check_int(query_rank, "query_rank", allow_none=True)
        refine_steps, refine_blocks = check_refine(refine_steps, refine_blocks, self.model)
        if refine_steps and (refine_data is None or response is not None):
            raise ValueError(
                f"refine_steps={refine_steps} needs refine_data (the data G is taken over) and no "
                "response (it solves (G + lambda I)^-1 exactly)"
            )
        curvature, lam = self._require_fitted(), self.damping(damping)
        raw = bool(refine_steps)  # refinement preconditions the raw gradients itself
        consumer = QueryGradientConsumer(
            list(self.layers), None if raw else curvature, lam, None if raw else query_rank, response or INVERSE
        )
        out = self.run(
            queries, consumer, self.measurement, "query gradients", batch_size, name="queries", shard=False
        ).result()
        if not raw:
            return out
        data = check_data(refine_data, "refinement data")
        grads = {n: q.full for n, q in out.items()}
        return refined_query_gradients(self, grads, lam, data, refine_steps, refine_blocks, batch_size, query_rank)

    def scores(
        self,
        queries: Any,
        train: Any,
        batch_size: int = 8,
        damping: float | None = None,
        query_rank: int | None = None,
        per_layer: bool = False,
        per_token: bool = False,
        candidates: int | None = None,
        refine_steps: int = 0,
        refine_blocks: str = "full",
        response: Inverse | None = None,
        cache: bool = True,
    ) -> Scores:
        """Influence of every training example on every query, ``Scores.values`` [Q, N], in one pass over ``train``.

        Positive: upweighting the example lowers the query's measurement (a LM: raises the
        completion's log-prob). With a workdir the run checkpoints and a finished run is cached
        under a key of everything it depends on (``_ScoreCache``; ``meta["cached"]`` says if it
        was a hit; ``cache=False`` bypasses it). ``candidates=N``: only each query's top-N BM25
        matches (``Scores.mask``). ``refine_steps``, ``response``: as in ``query_gradients``.
        """
        refine_steps, refine_blocks = check_refine(refine_steps, refine_blocks, self.model)
        options = dict(
            batch_size=batch_size,
            damping=damping,
            query_rank=query_rank,
            per_layer=per_layer,
            per_token=per_token,
            response=response,
        )
        if candidates is not None:
            if refine_steps:
                raise ValueError("refine_steps needs all of train for G; it cannot be combined with candidates=")
            from .filtering import scores_with_candidates

            return scores_with_candidates(self, queries, train, candidates, **options)
        train, batch_size = check_data(train, "training data"), check_int(batch_size, "batch_size")
        meta: dict[str, Any] = dict(strategy=self.strategy, damping=self.damping(damping), query_rank=query_rank)
        refine = [refine_steps, refine_blocks] if refine_steps else None
        meta.update(cached=False, refine=refine, response=response.spec() if response is not None else None)
        use_cache = self.workdir is not None and cache
        cached = _ScoreCache(self, meta, queries, train, per_layer, per_token, batch_size) if use_cache else None
        if cached is not None and (hit := cached.load()) is not None:
            return hit
        q = self.query_gradients(queries, batch_size, damping, query_rank, refine_steps, train, refine_blocks, response)
        for op in self.curvature.values():
            getattr(op, "release_casts", lambda: None)()
        acc = ScoreAccumulator(q, len(train), per_layer, per_token)
        self.run(train, acc, self.training_loss, "scoring", batch_size, checkpoint=cached and cached.checkpoint)
        result = acc.result(meta)
        if cached is not None:
            cached.save(result)
        return result

    def rank(
        self, queries: Any, train: Any, k: int = 20, batch_size: int = 8, damping: float | None = None, **kw: Any
    ) -> Any:
        """Each query's top-k and bottom-k training sequences with memory flat in N (``headwater.ranking``).

        ``kw``: ``query_rank``, ``per_layer``, ``values_path`` (write the full [Q, N] scores to that
        memory-mapped file), ``response``.
        """
        train, k = check_data(train, "training data"), check_int(k, "k")
        opts = {x: kw.pop(x) for x in ("per_layer", "values_path") if x in kw}
        q = self.query_gradients(queries, batch_size, damping, **kw)
        acc = RankingAccumulator(q, len(train), k, opts.get("per_layer", False), opts.get("values_path"))
        self.run(train, acc, self.training_loss, "scoring", batch_size)
        return acc.result({"strategy": self.strategy, "damping": self.damping(damping), "k": k})

    def self_influence(self, train: Any, batch_size: int = 8, damping: float | None = None) -> torch.Tensor:
        """grad L_m^T (G + lambda I)^-1 grad L_m for every training example, [N]."""
        train = check_data(train, "training data")
        batch_size = check_int(batch_size, "batch_size")
        acc = SelfInfluenceAccumulator(self._require_fitted(), self.damping(damping), len(train))
        self.run(train, acc, self.training_loss, "self-influence", batch_size)
        return acc.result()

    def plan(self, data: Any, batch_size: int = 8, **kwargs: Any) -> Any:
        """Memory, disk and time each stage will need, from one probed batch (``headwater.plan.plan_run``)."""
        return plan_run(self, data, batch_size=batch_size, **kwargs)

    # ------------------------------------------------------------------ index
    def build_index(self, train: Any, dim: int | None = None, batch_size: int = 8, **kwargs: Any) -> Any:
        """Build a persistent projected-gradient index of ``train`` (see ``headwater.index.build_index``)."""
        return build_index(self, train, dim=DEFAULT_DIM if dim is None else dim, batch_size=batch_size, **kwargs)

    def query_index(self, queries: Any, top_k: int | None = None, **kwargs: Any) -> Scores:
        """Score queries against a built index (see ``headwater.index.query_index``)."""
        return query_index(self, queries, top_k=top_k, **kwargs)


class _ScoreCache:
    """A finished score run in the workdir, keyed by everything it depends on, and its checkpoint.

    The key covers the factors' checksum, the model's current weights, the task's settings
    (tokenizer, max_length), both datasets' content and every option that changes a number.
    """

    def __init__(self, an: Attributor, meta: dict, queries: Any, train: Any, *options: Any):
        spec = {k: v for k, v in meta.items() if k != "cached"}
        spec.update(factors=an.factors_checksum, model=model_fingerprint(an.model), task=an.task.fingerprint())
        spec.update(queries=fingerprint(queries), train=fingerprint(train), options=list(options))
        self.key = spec_key(spec)
        self.meta = {"id": self.key, **spec}
        self.final = an.workdir.cached_scores(self.key)
        self.checkpoint = an.workdir.score_checkpoint(self.key, an.settings.checkpoint_every)

    def load(self) -> Scores | None:
        if not self.final.exists():
            return None
        tensors, saved = load_tensors(self.final, "cached scores", hint="delete it to recompute")
        return Scores.from_tensors(tensors, {**saved, "cached": True})

    def save(self, result: Scores) -> None:
        result.meta["run"] = self.meta
        barrier()
        if is_main():
            save_tensors(self.final, result.tensors(), result.meta)
        if self.checkpoint is not None:
            self.checkpoint.clear()


def _saved_curvature(workdir: Workdir, strategy: str, shapes: dict) -> tuple | None:
    """(curvature, factors checksum, fit-data fingerprint, fitted at) from a workdir's factors, or None."""
    saved = workdir.load_factors()
    if saved is None:
        return None
    tensors, meta, checksum = saved
    curvature = curvature_from_tensors(get_strategy(strategy), shapes, tensors, str(workdir.factors_path))
    return curvature, checksum, meta.get("fit_data"), meta.get("created")


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _local_path(model: nn.Module) -> str | None:
    """The local directory a HF model was loaded from, so the command line can reload it."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(Path(path).resolve()) if isinstance(path, str) and path and Path(path).is_dir() else None
