"""The ``Attributor``: fit curvature once, then score queries against training data.

Data path (one look)::

    data --iter_batches--> batch --task.loss / measurement--> Capture --(a, g, mask)-->
        CovarianceAccumulator -> eigh -> LambdaAccumulator      (fit)
        per-example query grads -> curvature.solve -> QueryGradients  (scores, query side)
        ScoreAccumulator / SelfInfluenceAccumulator             (scores, training side)

Example::

    an = hw.Attributor(model, task=hw.LanguageModelingTask(), modules="mlp", workdir="runs/a")
    an.fit(train, batch_size=8)
    res = an.scores(queries, train, batch_size=8, query_rank=32)
    res.top(5)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .capture import Capture, LayerCapture
from .curvature import (
    CovarianceAccumulator,
    DiagonalAccumulator,
    DiagonalCurvature,
    EigenCurvature,
    IdentityCurvature,
    LambdaAccumulator,
    LayerCurvature,
    per_example_grads,
    resolve_damping,
    warn_zero_curvature,
)
from .data import check_batch_size, check_data, fingerprint, iter_batches
from .distributed import all_reduce_, all_reduce_max, barrier, broadcast_, is_main, rank_world
from .errors import ExampleError, NotFittedError
from .layers import select_layers
from .refine import check_refine, refine
from .scoring import QueryGradients, ScoreAccumulator, Scores, SelfInfluenceAccumulator
from .storage import SCHEMA_VERSION, load_json, load_tensors, model_fingerprint, save_json, save_tensors
from .task import LanguageModelingTask, Task

__all__ = ["Attributor", "NotFittedError", "STRATEGIES", "FISHERS"]

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("auto", "topk", "importance", "sampled", "empirical", "exact")
DEFAULT_TOP = 8


# Config keys added after workdirs existed: a saved config without one was made with this value.
_CONFIG_DEFAULTS = {"samples": 1, "top": None}


def resolve_fisher(task: Task, fisher: str) -> str:
    """``"auto"`` -> ``"topk"`` when the task implements it on its own loss, else ``"sampled"``.

    A subclass of a built-in task that replaces ``loss`` keeps the paper's sampling: only its
    own ``loss(sample=True)`` knows how to draw its labels.
    """
    if fisher != "auto":
        return fisher
    kind = type(task)
    if kind.topk_losses is Task.topk_losses:
        return "sampled"
    builtin = next((c for c in kind.__mro__ if "topk_losses" in vars(c)), kind)
    return "topk" if kind.loss is builtin.loss else "sampled"


def _progress(iterable: Any, enabled: bool, desc: str, total: int) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", leave=False, dynamic_ncols=True)


class Attributor:
    """Influence functions with an EK-FAC (or K-FAC, diagonal, identity) Gauss-Newton.

    Parameters
    ----------
    model : nn.Module
        A HF causal LM or any PyTorch model; only its ``nn.Linear`` and HF ``Conv1D``
        layers are tracked. It is put in eval mode during each pass and restored after.
    task : Task
        Defines loss, query measurement and scored tokens. Defaults to
        ``LanguageModelingTask()``.
    strategy : {"identity", "diagonal", "kfac", "ekfac"}
    modules : None, "mlp" or list of str
        Which layers to track: every supported layer, the MLP projections, or by name.
    fisher : {"auto", "topk", "importance", "sampled", "empirical", "exact"}
        How the Gauss-Newton's pseudo-gradients are formed. "topk": the ``top`` likeliest
        labels per scored token exactly plus one draw from the rest, under random signs, in
        one backward pass; unbiased, and its Lambda and damping barely move with the seed,
        where a single draw's hinge on whether a rare label came up. "importance": one label
        per token drawn in proportion to its share of the Hessian's trace and reweighted, so
        every draw carries the same gradient magnitude (lowest spread of Lambda's mean on
        confident classifiers). "sampled": one label drawn from the model per token (the
        paper's choice). "empirical": the data's own labels.
        "exact": the expectation over labels, one backward pass per class (few outputs only).
        "auto" (default) is "topk" for the built-in tasks and "sampled" for tasks that do not
        implement ``topk_losses``; the resolved choice is in ``an.fisher``.
    samples : int
        Pseudo-losses (backward passes) per batch for "topk", "importance" and "sampled",
        averaged; all from one forward pass. Costs ``samples`` times the backward passes.
    top : int
        Labels per token that "topk" takes exactly (default 8).
    workdir : path or None
        Where factors persist; None keeps them in memory.
    seed : int
        Seeds the pseudo-label draws; each batch gets its own derived seed.
    progress : bool
        Show progress bars with rate and ETA.
    checkpoint_every : int or None
        With a workdir, save partial sums (fit) and finished score blocks (scores) every this
        many batches per rank, so an interrupted job resumes; None turns it off.
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
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is unknown; choose one of {STRATEGIES}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher={fisher!r} is unknown; choose one of {FISHERS}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        fisher = resolve_fisher(task, fisher)
        if samples != 1 and fisher not in ("sampled", "topk", "importance"):
            raise ValueError(f"samples={samples} draws pseudo-labels, but fisher={fisher!r} draws none; "
                             "use fisher='topk', 'importance' or 'sampled', or leave samples=1")  # fmt: skip
        self.model = model
        self.task = task
        self.strategy = strategy
        self.fisher = fisher
        self.samples = samples
        self.top = top
        self.seed = seed
        self.progress = progress
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ValueError(f"checkpoint_every must be None or a positive integer, got {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        self.layers = select_layers(model, modules)
        self.workdir = Path(workdir) if workdir is not None else None
        self.curvature: dict[str, LayerCurvature] | None = None
        self.fit_fingerprint: str | None = None
        self._config = {
            "schema": SCHEMA_VERSION,
            "headwater": __version__,
            "model": {"class": type(model).__name__, "fingerprint": model_fingerprint(model)},
            "task": type(task).__name__,
            "strategy": strategy,
            "fisher": fisher,
            "samples": samples,
            "top": top if fisher == "topk" else None,
            "seed": seed,
            "modules": {n: [ad.kind, ad.out_features, ad.in_features] for n, ad in self.layers.items()},
        }
        if strategy == "identity":
            self.curvature = {n: IdentityCurvature((ad.out_features, ad.in_features)) for n, ad in self.layers.items()}
        if self.workdir is not None:
            self._open_workdir()

    # ------------------------------------------------------------------ workdir
    def _open_workdir(self) -> None:
        cfg_path = self.workdir / "config.json"
        if not cfg_path.exists() and is_main():
            save_json(cfg_path, self._config)
        barrier()  # other ranks read what rank 0 wrote
        saved = load_json(cfg_path)
        for key in ("model", "task", "strategy", "fisher", "samples", "top", "seed", "modules"):
            if saved.get(key, _CONFIG_DEFAULTS.get(key)) != self._config[key]:
                if key == "model":
                    diff = "another model (its weights or architecture differ from this one's)"
                elif key == "modules":
                    diff = f"another module set ({len(saved.get(key) or {})} layers: {_short(saved.get(key))})"
                else:
                    diff = f"{key}={saved.get(key)!r} (this Attributor has {key}={self._config[key]!r})"
                raise ValueError(f"workdir {self.workdir} was made for {diff}; use a new workdir or delete this one")
        factors = self.workdir / "factors.safetensors"
        if factors.exists():
            tensors, meta = load_tensors(factors)
            self.curvature = _curvature_from_tensors(self.strategy, self.layers, tensors)
            self.fit_fingerprint = meta.get("fit_data")

    # ------------------------------------------------------------------ the data loop
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def _stream(
        self,
        data: Any,
        batch_size: int,
        name: str,
        losses: Callable[[Any], list[torch.Tensor]],
        consume: Callable[[LayerCapture, int, bool], None],
        phase: str,
        shard: bool = True,
        skip: Callable[[int], bool] | None = None,
        after_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        """One pass over ``data``: for each batch, each pseudo-loss, each tracked layer, consume.

        With ``shard``, batch b runs on rank ``b % world`` only. ``skip(b)`` drops batches a
        checkpoint already holds; ``after_batch(b, lo)`` runs when batch b is fully consumed.
        """
        device = self.device
        rank, world = rank_world() if shard else (0, 1)
        n_batches = (len(data) + batch_size - 1) // batch_size
        mine = [b for b in range(n_batches) if b % world == rank and not (skip and skip(b))]
        # A sharded (FSDP) model gathers its parameters collectively in every forward and
        # backward, so each rank must run as many passes as the busiest one: the others repeat
        # a batch whose captures are thrown away.
        fillers = all_reduce_max(len(mine)) - len(mine) if world > 1 and _is_sharded(self.model) else 0
        plan = mine + [mine[-1] if mine else 0] * fillers
        batches = _progress(iter_batches(data, self.task, batch_size, name, plan), self.progress, phase, len(plan))
        with self._eval_mode(), _no_sync(self.model), Capture(self.model, self.layers) as cap:
            for step, (lo, batch) in enumerate(batches):
                b = lo // batch_size
                filler = step >= len(mine)
                batch = self.task.to_device(batch, device)
                mask = self.task.token_mask(batch)
                if mask is not None:
                    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
                    if empty:
                        raise ExampleError(
                            lo + empty[0],
                            " has no scored tokens (every label is -100 or it is a single token); "
                            "remove it or unmask its completion",
                            f"{name} ",
                        )
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(_derive_seed(self.seed, phase, lo))
                    try:
                        ls = losses(batch)
                    except Exception:
                        cap.clear()
                        raise
                for k, loss in enumerate(ls):
                    for c in cap.backward(loss, mask, retain_graph=k < len(ls) - 1):
                        if not filler:
                            with torch.autocast(device.type, enabled=False):
                                consume(c, lo, k == 0)
                if after_batch is not None and not filler:
                    after_batch(b, lo)

    def _fit_losses(self, batch: Any) -> list[torch.Tensor]:
        if self.fisher == "exact":
            return list(self.task.gauss_newton_losses(self.model, batch))
        if self.fisher == "sampled":
            return self.task.sampled_losses(self.model, batch, self.samples)
        if self.fisher == "topk":
            return self.task.topk_losses(self.model, batch, self.samples, self.top)
        if self.fisher == "importance":
            return self.task.importance_losses(self.model, batch, self.samples)
        return [self.task.loss(self.model, batch, sample=False)]

    def _fit_pass(self, acc: Any, data: Any, batch_size: int, phase: str, fp: str, overwrite: bool) -> None:
        """One fitting pass with per-rank partial checkpoints, then a sum across ranks.

        Each rank saves its partial sums every ``checkpoint_every`` batches; a rerun on the same
        workdir loads them and skips the batches they cover. Per-batch seeds make the resumed
        result identical to an uninterrupted one.
        """
        rank, world = rank_world()
        part = None
        done = -1  # last batch index the partial state covers
        if self.workdir is not None and self.checkpoint_every:
            part = self.workdir / "partial" / f"{phase.replace(' ', '_')}.rank{rank}of{world}.safetensors"
            if part.exists() and not overwrite:
                tensors, meta = load_tensors(part)
                for key, value in (("fit_data", fp), ("batch_size", batch_size)):
                    if meta.get(key) != value:
                        raise ValueError(
                            f"{part} is a partial {phase} pass with {key}={meta.get(key)!r}, but this fit has "
                            f"{key}={value!r}; rerun with the original data and batch size, or pass overwrite=True"
                        )
                acc.load_state(tensors)
                done = meta["last_batch"]
        count = 0

        def after(b: int, lo: int) -> None:
            nonlocal count
            count += 1
            if part is not None and count % self.checkpoint_every == 0:
                save_tensors(part, acc.state(), {"fit_data": fp, "batch_size": batch_size, "last_batch": b})

        self._stream(
            data,
            batch_size,
            "training data",
            self._fit_losses,
            lambda c, lo, first: acc.update(c, first),
            phase,
            skip=lambda b: b <= done,
            after_batch=after,
        )
        all_reduce_(acc.state())
        if part is not None:
            barrier()  # every rank has its sums before any partial file goes
            part.unlink(missing_ok=True)

    # ------------------------------------------------------------------ fit
    def fit(self, data: Any, batch_size: int = 8, overwrite: bool = False) -> Attributor:
        """Estimate the curvature: covariances -> eigendecomposition -> eigenvalue correction.

        With a workdir, finished stages are saved and reused: a second ``fit`` on the same
        data loads the factors, a crash resumes from the last checkpoint. Under
        ``torch.distributed`` each rank takes every world-th batch, sums are all-reduced, and
        the eigendecompositions are spread over the ranks (layer i on rank i % world).
        """
        data = check_data(data, "training data")
        batch_size = check_batch_size(batch_size)
        if self.strategy == "identity":
            return self
        fp = fingerprint(data)
        if self.curvature is not None and not overwrite:
            if self.fit_fingerprint == fp:
                return self
            raise ValueError(
                f"workdir {self.workdir} already holds factors fitted on other data "
                f"(fingerprint {self.fit_fingerprint}, this data {fp}); pass overwrite=True "
                "to refit, or use a new workdir"
            )
        device = self.device
        if self.strategy == "diagonal":
            acc = DiagonalAccumulator(self.layers, device)
            self._fit_pass(acc, data, batch_size, "diagonal", fp, overwrite)
            curvature = {n: acc.diagonal(n) for n in self.layers}
        else:
            cov = CovarianceAccumulator(self.layers, device)
            stage = self.workdir / "covariance.safetensors" if self.workdir is not None else None
            saved = load_tensors(stage) if stage is not None and stage.exists() and not overwrite else None
            if saved is not None and saved[1].get("fit_data") == fp:
                cov.load_state(saved[0])
            else:
                self._fit_pass(cov, data, batch_size, "covariance", fp, overwrite)
                if stage is not None and is_main():
                    save_tensors(stage, cov.state(), {"fit_data": fp})
            curvature = self._eigendecompose(cov)
            if self.strategy == "ekfac":
                lam = LambdaAccumulator(curvature, device)
                self._fit_pass(lam, data, batch_size, "eigenvalue correction", fp, overwrite)
                curvature = {n: lam.ekfac(n) for n in self.layers}
        warn_zero_curvature(curvature)
        self.curvature = curvature
        self.fit_fingerprint = fp
        if self.workdir is not None and is_main():
            tensors = {f"{n}::{k}": v for n, op in curvature.items() for k, v in op.tensors().items()}
            save_tensors(self.workdir / "factors.safetensors", tensors, {"fit_data": fp, **self._config})
        barrier()
        return self

    def _eigendecompose(self, cov: CovarianceAccumulator) -> dict[str, EigenCurvature]:
        """fp64 eigendecompositions, layer i on rank i % world, then broadcast from each owner."""
        rank, world = rank_world()
        names = list(self.layers)
        eig = {}
        for i, n in enumerate(_progress(names, self.progress, "eigendecomposition", len(names))):
            if i % world == rank:
                eig[n] = cov.eigendecompose(n)
        if world > 1:
            for i, n in enumerate(names):
                if n not in eig:
                    ad = self.layers[n]
                    shapes = [(ad.in_features,) * 2, (ad.in_features,), (ad.out_features,) * 2, (ad.out_features,)]
                    eig[n] = [torch.empty(s, dtype=torch.float64, device=self.device) for s in shapes]
                broadcast_(eig[n], src=i % world)
        return {n: cov.kfac(n, eig[n]) for n in names}

    # ------------------------------------------------------------------ scores
    def _require_fitted(self) -> dict[str, LayerCurvature]:
        if self.curvature is None:
            raise NotFittedError(
                f"this Attributor (strategy={self.strategy!r}) is not fitted yet; call "
                "an.fit(train) first, or open a workdir that holds factors"
            )
        return self.curvature

    def damping(self, damping: float | None = None) -> dict[str, float]:
        """Per-layer damping: the paper's 0.1 x mean eigenvalue, or an absolute value.

        See ``curvature.resolve_damping`` for the floor that keeps a zero-curvature layer finite.
        """
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
    ) -> dict[str, QueryGradients]:
        """Preconditioned query gradients (G + lambda I)^-1 grad f_q per layer, optionally low-rank.

        Queries are processed batch by batch and truncated as they come, so memory holds
        only the (low-rank) result. Every rank computes all of them.

        ``refine_steps=n`` replaces them by n steps of preconditioned conjugate gradients toward
        the exact damped Gauss-Newton over ``refine_data`` (``headwater.refine``), EK-FAC being
        the preconditioner; ``refine_blocks`` is "full" (cross-layer terms of G) or "layer".
        That holds every query's full gradient in memory and costs n + 1 passes over the data.
        """
        queries = check_data(queries, "queries")
        batch_size = check_batch_size(batch_size)
        if query_rank is not None and (
            isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1
        ):
            raise ValueError(f"query_rank must be None or a positive integer, got {query_rank!r}")
        refine_steps, refine_blocks = check_refine(refine_steps, refine_blocks)
        if refine_steps and _is_sharded(self.model):
            raise ValueError(
                "refine_steps needs the model's plain parameters for its exact Gauss-Newton products, "
                "but this model is sharded (FSDP); refine on an unsharded copy, or use refine_steps=0"
            )
        if refine_steps and refine_data is None:
            raise ValueError(f"refine_steps={refine_steps} needs refine_data, the data G is taken over (the fit data)")
        curvature = self._require_fitted()
        lam = self.damping(damping)
        parts: dict[str, list[QueryGradients]] = {n: [] for n in self.layers}

        def consume(c: LayerCapture, lo: int, first: bool) -> None:
            g = per_example_grads(c.a, c.g)
            p = g if refine_steps else curvature[c.name].solve(g, lam[c.name])  # refine preconditions itself
            parts[c.name].append(QueryGradients.build(p, None if refine_steps else query_rank))

        measure = lambda b: [self.task.measurement(self.model, b)]  # noqa: E731
        self._stream(queries, batch_size, "queries", measure, consume, "query gradients", shard=False)
        out = {n: QueryGradients.concat(ps) for n, ps in parts.items()}
        if refine_steps:
            grads = {n: q.full for n, q in out.items()}
            refine_data = check_data(refine_data, "refinement data")
            with self._eval_mode():
                p = refine(self.model, self.task, self.layers, curvature, lam, grads, refine_data, refine_steps,
                           batch_size, refine_blocks).solution  # fmt: skip
            out = {n: QueryGradients.build(p[n].to(grads[n].dtype), query_rank) for n in self.layers}
        return out

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
    ) -> Scores:
        """Influence of every training example on every query: ``Scores.values`` [Q, N].

        One pass over ``train`` serves all queries. Positive means upweighting the training
        example lowers the query's measurement (for a LM: raises the completion's log-prob).

        With a workdir the run is checkpointed: every ``checkpoint_every`` batches each rank
        writes its finished score blocks to ``scores/<run>/``; a rerun with the same inputs
        loads them and scores only the rest, and a finished run is cached in
        ``scores/<run>.safetensors``.

        ``candidates=N`` scores only each query's top-N training sequences by the paper's BM25
        over token ids (``headwater.filtering``); the others get 0, and ``Scores.mask`` [Q, N]
        says which were scored.

        ``refine_steps=n`` refines the preconditioned query gradients by n conjugate-gradient
        steps toward the exact damped Gauss-Newton over ``train`` (see ``query_gradients``).
        """
        refine_steps, refine_blocks = check_refine(refine_steps, refine_blocks)
        if refine_steps and _is_sharded(self.model):
            raise ValueError(
                "refine_steps needs the model's plain parameters for its exact Gauss-Newton products, "
                "but this model is sharded (FSDP); refine on an unsharded copy, or use refine_steps=0"
            )
        if candidates is not None and refine_steps:
            raise ValueError("refine_steps needs the whole training set for G; it cannot be combined with candidates=")
        if candidates is not None:
            from .filtering import scores_with_candidates

            return scores_with_candidates(
                self, queries, train, candidates, batch_size=batch_size, damping=damping,
                query_rank=query_rank, per_layer=per_layer, per_token=per_token,
            )  # fmt: skip
        train = check_data(train, "training data")
        batch_size = check_batch_size(batch_size)
        run = None
        meta = {"strategy": self.strategy, "damping": self.damping(damping), "query_rank": query_rank}
        if refine_steps:
            meta["refine"] = {"steps": refine_steps, "blocks": refine_blocks}
        if self.workdir is not None:
            spec = {
                "queries": fingerprint(queries), "train": fingerprint(train), "fit": self.fit_fingerprint,
                "damping": damping, "query_rank": query_rank, "per_layer": per_layer, "per_token": per_token,
                "batch_size": batch_size,
            }  # fmt: skip
            if refine_steps:  # only then, so the ids of unrefined runs stay what they were
                spec["refine"] = [refine_steps, refine_blocks]
            run = self.workdir / "scores" / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
            meta["run"] = {**spec, "id": run.name}
            final = run.with_suffix(".safetensors")
            if final.exists():
                tensors, saved = load_tensors(final)
                return Scores.from_tensors(tensors, saved)
        q = self.query_gradients(queries, batch_size, damping, query_rank, refine_steps, train, refine_blocks)
        acc = ScoreAccumulator(q, len(train), per_layer, per_token)
        done: set[int] = set()
        if run is not None and run.exists():
            for path in sorted(run.glob("*.safetensors")):
                tensors, block_meta = load_tensors(path)
                done.update(block_meta["batches"])
                if is_main():  # blocks are summed across ranks once, so only one rank holds them
                    acc.add_block(tensors)
        barrier()  # every rank reads the finished blocks before any rank writes new ones
        pending: list[tuple[int, int]] = []
        rank, world = rank_world()

        def after(b: int, lo: int) -> None:
            acc.finish_batch(lo)
            pending.append((b, lo))
            if run is not None and self.checkpoint_every and len(pending) >= self.checkpoint_every:
                flush()

        def flush() -> None:
            if not pending:
                return
            name = f"rank{rank}of{world}-batch{pending[0][0]:09d}.safetensors"
            save_tensors(run / name, acc.block([lo for _, lo in pending]), {"batches": [b for b, _ in pending]})
            pending.clear()

        training_loss = lambda b: [self.task.loss(self.model, b, sample=False)]  # noqa: E731
        self._stream(
            train,
            batch_size,
            "training data",
            training_loss,
            lambda c, lo, first: acc.update(c, lo),
            "scoring",
            skip=lambda b: b in done,
            after_batch=after,
        )
        result = acc.result(meta)
        if run is not None:
            barrier()
            if is_main():
                save_tensors(run.with_suffix(".safetensors"), result.tensors(), meta)
                shutil.rmtree(run, ignore_errors=True)
            barrier()
        return result

    def self_influence(self, train: Any, batch_size: int = 8, damping: float | None = None) -> torch.Tensor:
        """grad L_m^T (G + lambda I)^-1 grad L_m for every training example, [N]."""
        train = check_data(train, "training data")
        batch_size = check_batch_size(batch_size)
        acc = SelfInfluenceAccumulator(self._require_fitted(), self.damping(damping), len(train))
        self._stream(
            train,
            batch_size,
            "training data",
            lambda b: [self.task.loss(self.model, b, sample=False)],
            lambda c, lo, first: acc.update(c, lo),
            "self-influence",
        )
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


def _is_sharded(model: nn.Module) -> bool:
    """Whether parameters are sharded across ranks (FSDP2's ``fully_shard`` or FSDP1)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


@contextlib.contextmanager
def _no_sync(model: nn.Module) -> Iterator[None]:
    """DDP must not wait for gradient all-reduces that headwater never triggers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def _short(names: Any) -> str:
    keys = list(names or {})
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def _derive_seed(seed: int, phase: str, start: int) -> int:
    h = hashlib.sha256(f"{seed}:{phase}:{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _curvature_from_tensors(strategy: str, layers: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LayerCurvature]:
    out: dict[str, LayerCurvature] = {}
    for name in layers:
        try:
            if strategy == "diagonal":
                out[name] = DiagonalCurvature(tensors[f"{name}::diag"])
            else:
                out[name] = EigenCurvature(tensors[f"{name}::q_a"], tensors[f"{name}::q_s"], tensors[f"{name}::lam"])
        except KeyError as e:
            raise ValueError(
                f"the saved factors have no entry {e} for layer {name!r}; the workdir is damaged, refit"
            ) from e
    return out
