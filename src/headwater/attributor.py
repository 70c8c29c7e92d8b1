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
    CovarianceAccumulator,
    DiagonalAccumulator,
    IdentityCurvature,
    Inverse,
    LambdaAccumulator,
    LayerCurvature,
    curvature_from_tensors,
    get_strategy,
    resolve_damping,
    warn_zero_curvature,
)
from .data import check_data, fingerprint
from .distributed import barrier, is_main
from .engine import Consumer, eval_mode, is_sharded, model_device, run_pass, spec_key
from .errors import NotFittedError
from .fisher import DEFAULT_TOP, FISHERS, pseudo_losses, resolve_fisher
from .layers import select_layers
from .refine import check_refine, refine
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
    def validate(cls, task: Task, **kw: Any) -> Settings:
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


class Attributor:
    """Influence functions with an EK-FAC (or K-FAC, diagonal, identity) Gauss-Newton.

    Parameters
    ----------
    model : nn.Module
        A HF causal LM or any PyTorch model; its ``nn.Linear`` and HF ``Conv1D`` layers are
        tracked. It is put in eval mode during each pass and restored after.
    task : Task
        Loss, query measurement and scored tokens. Defaults to ``LanguageModelingTask()``.
    strategy : {"identity", "diagonal", "kfac", "ekfac"}
    modules : None, "mlp" or list of str
        Which layers to track: every supported layer, the MLP projections, or by name.
    fisher : {"auto", "topk", "importance", "sampled", "empirical", "exact"}
        How the Gauss-Newton's pseudo-gradients are formed (``headwater.fisher``). "auto" is
        "topk" for the built-in tasks and "sampled" for tasks without ``scored_outputs``;
        ``an.fisher`` holds the resolved choice.
    samples : int
        Pseudo-losses (backward passes) per batch, averaged; all from one forward pass.
    top : int
        Labels per token that "topk" takes exactly (default 8).
    workdir : path or None
        Where factors, checkpoints and cached scores persist; None keeps them in memory.
    seed : int
        Seeds the pseudo-label draws; each batch gets its own derived seed.
    progress : bool
        Show progress bars with rate and ETA.
    checkpoint_every : int or None
        With a workdir, save progress every this many batches per rank, so an interrupted job
        resumes; None turns it off.
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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        task = LanguageModelingTask() if task is None else task
        if not isinstance(task, Task):
            raise TypeError(
                f"task must be a headwater Task (e.g. hw.LanguageModelingTask()), got {type(task).__name__}"
            )
        self.settings = Settings.validate(
            task,
            strategy=strategy,
            fisher=fisher,
            samples=samples,
            top=top,
            seed=seed,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
        self.model, self.task = model, task
        self.layers = select_layers(model, modules)
        self.shapes = {n: (ad.out_features, ad.in_features) for n, ad in self.layers.items()}
        self.curvature: dict[str, LayerCurvature] | None = None
        self.fit_fingerprint: str | None = None
        self.factors_checksum: str | None = None
        self.fitted_at: str | None = None  # when the factors were fitted (from the workdir)
        s = self.settings
        self.config = {
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
            "modules": {n: [ad.kind, ad.out_features, ad.in_features] for n, ad in self.layers.items()},
            "layers": list(self.layers),  # model order (JSON objects are written with sorted keys)
        }
        if s.strategy == "identity":
            self.curvature = {n: IdentityCurvature(shape) for n, shape in self.shapes.items()}
        self.workdir = Workdir(workdir) if workdir is not None else None
        if self.workdir is not None:
            self.workdir.open(self.config)
            self._load_factors()

    # the settings, by name (read-only)
    strategy = property(lambda self: self.settings.strategy)
    fisher = property(lambda self: self.settings.fisher)
    samples = property(lambda self: self.settings.samples)
    top = property(lambda self: self.settings.top)
    seed = property(lambda self: self.settings.seed)
    progress = property(lambda self: self.settings.progress)
    device = property(lambda self: model_device(self.model))

    def _load_factors(self) -> None:
        saved = self.workdir.load_factors()
        if saved is not None:
            tensors, meta, self.factors_checksum = saved
            self.curvature = curvature_from_tensors(
                get_strategy(self.strategy), self.shapes, tensors, str(self.workdir.factors_path)
            )
            self.fit_fingerprint = meta.get("fit_data")
            self.fitted_at = meta.get("created")

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
        return run_pass(
            self.model,
            self.task,
            self.layers,
            data,
            consumer,
            losses=losses,
            batch_size=batch_size,
            phase=phase,
            seed=self.seed,
            progress=self.progress,
            **kw,
        )

    def _fit_pass(self, acc: Consumer, data: Any, batch_size: int, phase: str, spec: dict, overwrite: bool) -> None:
        every = self.settings.checkpoint_every
        ckpt = self.workdir.fit_checkpoint(phase, spec, every, overwrite) if self.workdir is not None else None
        self.run(data, acc, self.fit_losses, phase, batch_size, checkpoint=ckpt)
        if ckpt is not None:
            ckpt.clear()

    # ------------------------------------------------------------------ fit
    def fit(self, data: Any, batch_size: int = 8, overwrite: bool = False, keep_covariance: bool = False) -> Attributor:
        """Estimate the curvature: covariance pass -> eigendecomposition -> eigenvalue-correction pass.

        With a workdir, the factors are saved and reused (a second ``fit`` on the same data loads
        them), a crash resumes from the last checkpoint, and refitting removes every result
        derived from the old factors. The covariance sums are removed after the fit unless
        ``keep_covariance``. Under ``torch.distributed`` each rank takes every world-th batch
        and the eigendecompositions are spread over the ranks.
        """
        data = check_data(data, "training data")
        batch_size = check_int(batch_size, "batch_size")
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
        spec = {"fit_data": fp, "batch_size": batch_size, "config": spec_key(self.config)}
        if strategy.diagonal:
            acc = DiagonalAccumulator(self.shapes, self.device)
            self._fit_pass(acc, data, batch_size, "diagonal", spec, overwrite)
            curvature = acc.diagonal()
        else:
            cov = CovarianceAccumulator(self.shapes, self.device)
            saved = self.workdir.load_covariance(spec) if self.workdir is not None and not overwrite else None
            if saved is not None:
                cov.load_state(saved)
            else:
                self._fit_pass(cov, data, batch_size, "covariance", spec, overwrite)
                if self.workdir is not None:  # a crash from here on resumes after the covariance pass
                    self.workdir.save_covariance(cov.state(), spec)
            curvature = cov.kfac(self.progress)
            if strategy.eigenvalue_correction:
                lam = LambdaAccumulator(curvature, self.device)
                self._fit_pass(lam, data, batch_size, "eigenvalue correction", spec, overwrite)
                curvature = lam.ekfac()
        warn_zero_curvature(curvature)
        self.curvature, self.fit_fingerprint, self.fitted_at = curvature, fp, _now()
        if self.workdir is not None:
            tensors = {f"{n}::{k}": v for n, op in curvature.items() for k, v in op.tensors().items()}
            self.workdir.replace_config(self.config)
            meta = {"fit_data": fp, "created": _now(), "batch_size": batch_size, **self.config}
            self.factors_checksum = self.workdir.save_factors(tensors, meta)
            if not keep_covariance:
                self.workdir.drop_covariance()
            self.workdir.tidy()
        return self

    # ------------------------------------------------------------------ scores
    def _require_fitted(self) -> dict[str, LayerCurvature]:
        if self.curvature is None:
            raise NotFittedError(
                f"this Attributor (strategy={self.strategy!r}) is not fitted yet; call "
                "an.fit(train) first, or open a workdir that holds factors"
            )
        return self.curvature

    def damping(self, damping: float | None = None) -> dict[str, float]:
        """Per-layer damping: the paper's 0.1 x mean eigenvalue (floored where it is 0), or an absolute value."""
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
        """Preconditioned query gradients (G + lambda I)^-1 grad f_q per layer, optionally low-rank.

        Every rank computes all of them. ``refine_steps=n`` replaces them by n preconditioned
        conjugate-gradient steps toward the exact damped Gauss-Newton over ``refine_data``
        (``headwater.refine``), EK-FAC being the preconditioner; ``refine_blocks`` is "full"
        (cross-layer terms of G) or "layer". That holds every query's full gradient in memory
        and costs n + 1 passes over the data. ``response`` replaces the damped inverse by another
        spectral function of the fitted eigenvalues (see ``curvature.Inverse``).
        """
        queries = check_data(queries, "queries")
        batch_size = check_int(batch_size, "batch_size")
        query_rank = check_int(query_rank, "query_rank", allow_none=True)
        refine_steps, refine_blocks = self._check_refine(refine_steps, refine_blocks)
        if refine_steps and refine_data is None:
            raise ValueError(f"refine_steps={refine_steps} needs refine_data, the data G is taken over (the fit data)")
        if refine_steps and response is not None:
            raise ValueError("refine_steps solves (G + lambda I)^-1 exactly; it cannot apply another response")
        curvature, lam = self._require_fitted(), self.damping(damping)
        consumer = QueryGradientConsumer(
            list(self.layers),
            None if refine_steps else curvature,
            lam,
            None if refine_steps else query_rank,
            response or INVERSE,
        )
        self.run(queries, consumer, self.measurement, "query gradients", batch_size, name="queries", shard=False)
        out = consumer.result()
        if refine_steps:
            grads = {n: q.full for n, q in out.items()}
            refine_data = check_data(refine_data, "refinement data")
            with eval_mode(self.model):
                p = refine(
                    self.model,
                    self.task,
                    self.layers,
                    curvature,
                    lam,
                    grads,
                    refine_data,
                    refine_steps,
                    batch_size,
                    refine_blocks,
                ).solution
            out = {n: QueryGradients.build(p[n].to(grads[n].dtype), query_rank) for n in self.layers}
        return out

    def _check_refine(self, steps: Any, blocks: Any) -> tuple[int, str]:
        steps, blocks = check_refine(steps, blocks)
        if steps and is_sharded(self.model):
            raise ValueError(
                "refine_steps needs the model's plain parameters for its exact Gauss-Newton products, "
                "but this model is sharded (FSDP); refine on an unsharded copy, or use refine_steps=0"
            )
        return steps, blocks

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
        """Influence of every training example on every query: ``Scores.values`` [Q, N].

        One pass over ``train`` serves all queries. Positive means upweighting the training
        example lowers the query's measurement (for a LM: raises the completion's log-prob).

        With a workdir the run is checkpointed every ``checkpoint_every`` batches and a
        finished run is cached under a key of everything it depends on (the factors' checksum,
        the model, the task's settings, both datasets' content, the resolved damping and the
        options), so a changed input always recomputes. ``candidates=N`` scores only each
        query's top-N BM25 matches (``headwater.filtering``); ``Scores.mask`` marks them.
        ``refine_steps=n`` refines the query gradients toward the exact damped Gauss-Newton.
        ``response`` replaces the damped inverse by another spectral function (``curvature.Inverse``).
        ``cache=False`` neither reads nor writes the workdir's cache (small one-off re-scorings).
        ``meta["cached"]`` says whether the result came from the cache.
        """
        refine_steps, refine_blocks = self._check_refine(refine_steps, refine_blocks)
        if candidates is not None and refine_steps:
            raise ValueError("refine_steps needs the whole training set for G; it cannot be combined with candidates=")
        if candidates is not None:
            from .filtering import scores_with_candidates

            return scores_with_candidates(
                self,
                queries,
                train,
                candidates,
                batch_size=batch_size,
                damping=damping,
                query_rank=query_rank,
                per_layer=per_layer,
                per_token=per_token,
                response=response,
            )
        train = check_data(train, "training data")
        batch_size = check_int(batch_size, "batch_size")
        lam = self.damping(damping)
        meta: dict[str, Any] = {"strategy": self.strategy, "damping": lam, "query_rank": query_rank, "cached": False}
        if refine_steps:
            meta["refine"] = {"steps": refine_steps, "blocks": refine_blocks}
        if response is not None:
            meta["response"] = response.spec()
        key = final = None
        if self.workdir is not None and cache:
            spec = {
                "factors": self.factors_checksum,
                "model": model_fingerprint(self.model),
                "task": self.task.fingerprint(),
                "queries": fingerprint(queries),
                "train": fingerprint(train),
                "damping": lam,
                "query_rank": query_rank,
                "per_layer": per_layer,
                "per_token": per_token,
                "batch_size": batch_size,
                "refine": [refine_steps, refine_blocks] if refine_steps else None,
                "response": response.spec() if response is not None else None,
            }
            key = spec_key(spec)
            meta["run"] = {**spec, "id": key}
            final = self.workdir.cached_scores(key)
            if final.exists():
                tensors, saved = load_tensors(final, "cached scores", hint="delete it to recompute")
                return Scores.from_tensors(tensors, {**saved, "cached": True})
        q = self.query_gradients(queries, batch_size, damping, query_rank, refine_steps, train, refine_blocks, response)
        acc = ScoreAccumulator(q, len(train), per_layer, per_token)
        ckpt = self.workdir.score_checkpoint(key, self.settings.checkpoint_every) if key else None
        self.run(train, acc, self.training_loss, "scoring", batch_size, checkpoint=ckpt)
        result = acc.result(meta)
        if final is not None:
            barrier()
            if is_main():
                save_tensors(final, result.tensors(), meta)
            if ckpt is not None:
                ckpt.clear()
        return result

    def self_influence(self, train: Any, batch_size: int = 8, damping: float | None = None) -> torch.Tensor:
        """grad L_m^T (G + lambda I)^-1 grad L_m for every training example, [N]."""
        train = check_data(train, "training data")
        batch_size = check_int(batch_size, "batch_size")
        acc = SelfInfluenceAccumulator(self._require_fitted(), self.damping(damping), len(train))
        self.run(train, acc, self.training_loss, "self-influence", batch_size)
        return acc.result()

    # ------------------------------------------------------------------ index
    def build_index(self, train: Any, dim: int | None = None, batch_size: int = 8, **kwargs: Any) -> Any:
        """Build a persistent projected-gradient index of ``train`` (see ``headwater.index.build_index``)."""
        from .index import DEFAULT_DIM, build_index

        return build_index(self, train, dim=DEFAULT_DIM if dim is None else dim, batch_size=batch_size, **kwargs)

    def query_index(self, queries: Any, top_k: int | None = None, **kwargs: Any) -> Scores:
        """Score queries against a built index (see ``headwater.index.query_index``)."""
        from .index import query_index

        return query_index(self, queries, top_k=top_k, **kwargs)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _local_path(model: nn.Module) -> str | None:
    """The local directory a HF model was loaded from, so the command line can reload it."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(Path(path).resolve()) if isinstance(path, str) and path and Path(path).is_dir() else None
