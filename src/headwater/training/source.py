"""SOURCE (Bae, Lin, Lorraine & Grosse 2024): influence through the training run, segment by segment.

Training is cut into L segments at checkpoints theta_1 .. theta_L (theta_L: the final weights).
Within segment l the curvature is taken as constant, fitted at theta_l on the segment's data, and
the optimizer step as linear, so upweighting example m during segment l moves the final weights by

    d theta_L / d eps = -T_L ... T_{l+1} R_l grad L_m(theta_l),
    R_l = (I - exp(-t_l P_l H_l)) H_l^-1,      T_l = exp(-t_l P_l H_l),

with H_l = G_l + weight decay (+ damping), P_l Adam's preconditioner (I for SGD) and t_l the
segment's learning-rate sum times the loss scale. In the eigenbasis of each segment's fitted G both
are functions of the eigenvalues (``preconditioner`` says what is approximated for Adam). The
score of m is the sum, over the segments whose data contained m, of ``<R_l v_l, grad L_m(theta_l)>``
with ``v_L = grad f_q(theta_L)`` and ``v_{l-1} = T_l^T v_l``: the query gradient at the final
weights carried back through each later segment, each in its own eigenbasis. ``Source.scores``
walks the checkpoints from the last to the first, so one model copy is in memory at a time.

Cost: L curvature fits (EK-FAC: 2 passes over each segment's data), L scoring passes (one per
segment over its data) and one query pass; ``Source.cost`` counts what ran. The TracIn-style
baselines (``Source.tracin``) need no fit for gradient dot products (``curvature="identity"``),
or one plain fit per checkpoint for an ensemble of influence functions, and one query pass per
checkpoint (their query gradients are taken at each checkpoint).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attributor import Attributor
from ..curvature import LayerCurvature, resolve_damping
from ..data import Subset, check_data
from ..scoring import QueryGradientConsumer, QueryGradients, ScoreAccumulator, Scores
from ..storage import load_tensors
from ..task import LanguageModelingTask, Task
from ..validation import check_choice, check_int, check_number
from .preconditioner import AdamPreconditioner, canonical_blocks, eigen_diagonal, fitted_curvature, with_diagonal
from .responses import PreconditionedDecay, PreconditionedUnrolled

__all__ = ["Segment", "Source", "SegmentDynamics", "read_state_dict", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class Segment:
    """One stretch of training between two checkpoints: its optimizer, step count and data.

    lr : the mean learning rate over the segment's steps (only ``lr * steps`` matters).
    steps : optimizer steps in the segment.
    data : indices into ``Source``'s ``train`` of the examples the segment trained on (None: all).
    weight_decay : the L2 coefficient: torch SGD's and Adam's ``weight_decay`` (added to the
        gradient), or AdamW's decoupled one; a float, or ``{parameter name: value}`` (e.g. no decay
        on biases, as the HF Trainer does).
    optimizer : "sgd" (with ``momentum``), "adam" (L2 inside the preconditioned gradient) or
        "adamw" (decoupled decay). Adam needs ``second_moments``: Adam's bias-corrected
        ``exp_avg_sq`` per parameter name, an ``AdamPreconditioner``, or "estimate" (from minibatch
        gradients at the checkpoint; see ``AdamPreconditioner.estimate`` for when that is poor).
    loss_scale : the training loss is ``loss_scale`` x the mean over examples of the task's
        per-example loss; "token" for a token-mean language-model loss (1 / mean scored tokens
        per example of the segment's data, which is what the HF Trainer optimises).
    """

    lr: float
    steps: float
    data: Sequence[int] | None = None
    weight_decay: float | Mapping[str, float] = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.0
    second_moments: Mapping[str, torch.Tensor] | AdamPreconditioner | str | None = None
    eps: float = 1e-8
    loss_scale: float | str = 1.0
    batch_size: int | None = None  # for second_moments="estimate": the training batch size
    name: str = ""

    def __post_init__(self) -> None:
        self.lr = check_number(self.lr, "Segment.lr", low=0.0, low_inclusive=False)
        self.steps = check_number(self.steps, "Segment.steps", low=0.0, low_inclusive=False)
        check_choice(self.optimizer, "Segment.optimizer", OPTIMIZERS)
        self.momentum = check_number(self.momentum, "Segment.momentum", high=0.999999)
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"Segment.momentum={self.momentum} is SGD's heavy-ball momentum; Adam's beta1 needs none (its "
                "bias-corrected average passes the gradient through): leave momentum=0 for optimizer="
                f"{self.optimizer!r}"
            )
        if not isinstance(self.weight_decay, Mapping):
            self.weight_decay = check_number(self.weight_decay, "Segment.weight_decay")
        if isinstance(self.loss_scale, str):
            check_choice(self.loss_scale, "Segment.loss_scale", ("token",))
        else:
            self.loss_scale = check_number(self.loss_scale, "Segment.loss_scale", low=0.0, low_inclusive=False)
        adam = self.optimizer in ("adam", "adamw")
        if adam and self.second_moments is None:
            raise ValueError(
                f"Segment(optimizer={self.optimizer!r}) needs second_moments: Adam's exp_avg_sq per parameter "
                "(HeadwaterCallback records them), an AdamPreconditioner, or 'estimate'"
            )
        if not adam and self.second_moments is not None:
            raise ValueError("Segment.second_moments is Adam's state; it needs optimizer='adam' or 'adamw'")
        if isinstance(self.second_moments, str) and self.second_moments != "estimate":
            raise ValueError(f"Segment.second_moments={self.second_moments!r}: the only string accepted is 'estimate'")
        if self.data is not None:
            self.data = [int(i) for i in self.data]
            if not self.data:
                raise ValueError("Segment.data is empty; give the indices of the examples it trained on, or None")

    def spec(self) -> dict:
        """JSON-able description (tensors by shape only)."""
        wd = self.weight_decay
        if isinstance(wd, Mapping):  # per parameter: the distinct values, not every name
            wd = {"per_parameter": sorted({float(v) for v in wd.values()})}
        return {
            "lr": self.lr,
            "steps": self.steps,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": wd,
            "loss_scale": self.loss_scale,
            "data": None if self.data is None else len(self.data),
            "name": self.name,
        }


@dataclass
class SegmentDynamics:
    """One segment's linearised training per layer: ``respond`` (R) and ``carry`` (T^T).

    ``curvature``: G's operators with the segment's L2 weight decay folded into the eigenvalues;
    ``scale``: Adam's P in each layer's eigen-coordinates (None for SGD); ``shift``: AdamW's
    decoupled decay there (None otherwise); ``horizon`` t; ``damping`` added to every eigenvalue.
    """

    curvature: dict[str, LayerCurvature]
    damping: dict[str, float]
    horizon: float
    scale: dict[str, torch.Tensor] | None = None
    shift: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0

    def _apply(self, grads: dict[str, torch.Tensor], kind: type) -> dict[str, torch.Tensor]:
        out = {}
        for n, v in grads.items():
            fn = kind(
                self.horizon,
                None if self.scale is None else self.scale[n],
                None if self.shift is None else self.shift[n],
            )
            out[n] = self.curvature[n].solve(v, self.damping[n], fn)
        return out

    def respond(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``R v`` per layer, for v [Q, O, I]."""
        return self._apply(grads, PreconditionedUnrolled)

    def carry(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``T^T v`` per layer: the query gradient as seen before this segment."""
        return self._apply(grads, PreconditionedDecay)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A model's weights from a checkpoint directory or file: safetensors (sharded or not) or ``pytorch_model.bin``.

    HF Trainer directories (``checkpoint-500/``) and ``save_pretrained`` directories both work.
    A ``.bin`` file is read with ``torch.load(weights_only=True)``, which unpickles no code.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_dict(path / name)
        raise FileNotFoundError(
            f"{path} holds no model weights (model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin); give a checkpoint directory written by the HF Trainer or save_pretrained"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            out.update(read_state_dict(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            ours = "headwater" in (f.metadata() or {})
        return load_tensors(path, "checkpoint weights")[0] if ours else load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"checkpoint {path}: unknown weights format {path.suffix!r}; use .safetensors or .bin")


Checkpoint = str | Path | Mapping[str, torch.Tensor] | nn.Module


class Source:
    """SOURCE over checkpoints, and the TracIn-style checkpoint ensembles, with one API.

    Parameters
    ----------
    model : nn.Module
        The architecture; state-dict and path checkpoints are loaded into a copy of it.
    checkpoints : list
        One per segment, at (or near) the segment's end, in training order; the last holds the
        final weights. Each is an ``nn.Module``, a state dict, or a checkpoint directory/file.
    segments : list of Segment
        The optimizer, step count and data of each segment (``headwater.integrations`` records them).
    train : dataset
        The examples to score; each segment's ``data`` indexes into it.
    strategy, modules, fisher, samples, top, seed : as for ``Attributor``.
    damping : float or None
        Added to every eigenvalue of each segment's curvature (on top of its weight decay). The
        unrolled response is finite without it, so the default is 0; None applies the paper's
        0.1 x mean eigenvalue per layer and segment.
    batch_size : the batch size of every pass.
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Checkpoint],
        segments: Sequence[Segment],
        train: Any,
        task: Task | None = None,
        modules: None | str | list[str] = None,
        strategy: str = "ekfac",
        fisher: str = "auto",
        samples: int = 1,
        top: int = 8,
        seed: int = 0,
        damping: float | None = 0.0,
        batch_size: int = 8,
        progress: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the architecture), got {type(model).__name__}")
        checkpoints, segments = list(checkpoints), list(segments)
        if not segments:
            raise ValueError("segments is empty; give one Segment per stretch of training")
        if len(checkpoints) != len(segments):
            raise ValueError(
                f"got {len(checkpoints)} checkpoints for {len(segments)} segments; give one checkpoint per "
                "segment, taken at its end (the last one is the final model)"
            )
        for i, s in enumerate(segments):
            if not isinstance(s, Segment):
                raise TypeError(f"segments[{i}] must be a headwater.training.Segment, got {type(s).__name__}")
        for i, c in enumerate(checkpoints):
            if not isinstance(c, (str, Path, Mapping, nn.Module)):
                raise TypeError(
                    f"checkpoints[{i}] must be an nn.Module, a state dict or a checkpoint path, got {type(c).__name__}"
                )
        self.train = check_data(train, "training data")
        for i, s in enumerate(segments):
            if s.data is not None and (max(s.data) >= len(self.train) or min(s.data) < 0):
                raise ValueError(
                    f"segments[{i}].data indexes example {max(s.data)}, but train has {len(self.train)} examples"
                )
        self.model, self.checkpoints, self.segments = model, checkpoints, segments
        self.task = LanguageModelingTask() if task is None else task
        self.modules, self.strategy = modules, strategy
        self.options = {"fisher": fisher, "samples": samples, "top": top, "seed": seed, "progress": progress}
        self.damping = check_number(damping, "damping", allow_none=True, hint="0 (default) or None for the paper's")
        self.batch_size = check_int(batch_size, "batch_size")
        Attributor(model, task=self.task, strategy=strategy, modules=modules, **self.options)  # validates the options
        self.dynamics: dict[int, SegmentDynamics] = {}
        self.cost: dict[str, float] = {"fit_passes": 0, "scoring_passes": 0, "query_passes": 0, "seconds": 0.0}
        self._work: nn.Module | None = None

    # ------------------------------------------------------------------ checkpoints
    def load(self, i: int) -> nn.Module:
        """The model at checkpoint i (a shared working copy for state dicts and paths)."""
        c = self.checkpoints[i]
        if isinstance(c, nn.Module):
            return c
        state = read_state_dict(c) if isinstance(c, (str, Path)) else c
        if self._work is None:
            self._work = copy.deepcopy(self.model)
        try:
            self._work.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoints[{i}] does not fit the model: {str(e).splitlines()[0]}") from e
        return self._work

    def attributor(self, model: nn.Module, strategy: str | None = None) -> Attributor:
        return Attributor(
            model, task=self.task, strategy=strategy or self.strategy, modules=self.modules, **self.options
        )

    def segment_data(self, i: int) -> Any:
        s = self.segments[i]
        return self.train if s.data is None else Subset(self.train, s.data)

    def columns(self, i: int) -> torch.Tensor:
        s = self.segments[i]
        return torch.arange(len(self.train)) if s.data is None else torch.tensor(s.data)

    # ------------------------------------------------------------------ one segment's dynamics
    def loss_scale(self, i: int) -> float:
        """The segment's c: given, or 1 / mean scored tokens per example of its data ("token")."""
        s = self.segments[i]
        if s.loss_scale != "token":
            return float(s.loss_scale)
        tokens = sequences = 0
        from ..data import iter_batches

        for _, batch in iter_batches(self.segment_data(i), self.task, self.batch_size, "training data"):
            mask = self.task.token_mask(batch)
            sequences += len(mask) if mask is not None else 1
            tokens += int(mask.sum()) if mask is not None else 1
        return sequences / max(tokens, 1)

    def horizon(self, i: int) -> float:
        """t = c x sum of the segment's learning rates (/ (1 - momentum) for SGD's heavy ball)."""
        s = self.segments[i]
        return self.loss_scale(i) * s.lr * s.steps / (1.0 - s.momentum)

    def _preconditioner(self, i: int, an: Attributor) -> AdamPreconditioner | None:
        s = self.segments[i]
        if s.optimizer == "sgd":
            return None
        if isinstance(s.second_moments, AdamPreconditioner):
            return s.second_moments
        if s.second_moments == "estimate":
            bs = s.batch_size or self.batch_size
            return AdamPreconditioner.estimate(an, self.segment_data(i), bs, self.loss_scale(i), s.eps)
        return AdamPreconditioner.from_parameters(an.model, an.layers, s.second_moments, s.eps)

    def _weight_decay(self, i: int, an: Attributor, c: float) -> dict[str, torch.Tensor]:
        """The segment's weight decay per layer [O, I], in G's units (wd / c)."""
        s = self.segments[i]
        if isinstance(s.weight_decay, Mapping):
            params = dict(an.model.named_parameters())
            full = {
                k: torch.full(p.shape, float(s.weight_decay.get(k, 0.0)), dtype=torch.float64)
                for k, p in params.items()
            }
            wd = canonical_blocks(an.model, an.layers, full, "weight_decay")
        else:
            wd = {n: torch.full(shape, float(s.weight_decay), dtype=torch.float64) for n, shape in an.shapes.items()}
        return {n: w / c for n, w in wd.items()}

    def fit_segment(self, i: int, model: nn.Module | None = None) -> SegmentDynamics:
        """Fit (once) segment i's curvature at its checkpoint, on its data, and its rates."""
        if i in self.dynamics:
            return self.dynamics[i]
        t0 = time.perf_counter()
        s = self.segments[i]
        an = self.attributor(model if model is not None else self.load(i))
        ops = fitted_curvature(an, self.segment_data(i), self.batch_size)
        self.cost["fit_passes"] += {"identity": 0, "diagonal": 1, "kfac": 1, "ekfac": 2}[self.strategy]
        c = self.loss_scale(i)
        damping = resolve_damping(ops, None) if self.damping is None else {n: self.damping for n in ops}
        wd = self._weight_decay(i, an, c)
        pre = self._preconditioner(i, an)
        scale = shift = None
        if pre is not None:
            scale = {n: eigen_diagonal(op, pre.scale(n), n) for n, op in ops.items()}
        if s.optimizer == "adamw":  # decoupled: the decay is not preconditioned, and not part of H
            shift = {n: eigen_diagonal(op, wd[n], n) for n, op in ops.items()}
        else:  # SGD's and Adam's L2 term is part of H
            ops = {n: with_diagonal(op, wd[n], n) for n, op in ops.items()}
        dyn = SegmentDynamics(ops, damping, self.horizon(i), scale, shift, time.perf_counter() - t0)
        self.dynamics[i] = dyn
        self.cost["seconds"] += dyn.seconds
        return dyn

    def fit(self) -> Source:
        """Fit every segment (``scores`` fits what is missing on its way, so this is optional)."""
        for i in range(len(self.segments)):
            self.fit_segment(i)
        return self

    # ------------------------------------------------------------------ passes
    def _query_gradients(self, an: Attributor, queries: Any) -> dict[str, torch.Tensor]:
        consumer = QueryGradientConsumer(list(an.layers), None, {}, None)
        an.run(queries, consumer, an.measurement, "query gradients", self.batch_size, name="queries", shard=False)
        self.cost["query_passes"] += 1
        return {n: q.full.double() for n, q in consumer.result().items()}

    def _score(self, an: Attributor, i: int, pre: dict[str, torch.Tensor], per_layer: bool) -> Scores:
        dtype = torch.float64 if next(an.model.parameters()).dtype == torch.float64 else torch.float32
        q = {n: QueryGradients(full=t.to(an.device, dtype)) for n, t in pre.items()}
        data = self.segment_data(i)
        acc = ScoreAccumulator(q, len(data), per_layer, False)
        an.run(data, acc, an.training_loss, "scoring", self.batch_size)
        self.cost["scoring_passes"] += 1
        return acc.result({})

    def _assemble(self, parts: list[tuple[int, Scores]], n_queries: int, per_layer: bool, meta: dict) -> Scores:
        values = torch.zeros(n_queries, len(self.train), dtype=torch.float64)
        layers: dict[str, torch.Tensor] = {}
        for i, s in parts:
            cols = self.columns(i)
            values[:, cols] += s.values.double()
            for n, v in (s.per_layer or {}).items():
                layers.setdefault(n, torch.zeros_like(values))[:, cols] += v.double()
        return Scores(values, layers if per_layer else None, None, meta)

    # ------------------------------------------------------------------ scores
    def scores(self, queries: Any, per_layer: bool = False) -> Scores:
        """SOURCE scores [Q, N]: the sum over segments of ``<R_l v_l, grad L_m(theta_l)>`` (module docstring).

        Walks the checkpoints from the last to the first (one model in memory at a time),
        fitting each segment on the way if ``fit`` has not.
        """
        queries = check_data(queries, "queries")
        t0 = time.perf_counter()
        last = len(self.segments) - 1
        model = self.load(last)
        v = self._query_gradients(self.attributor(model, "identity"), queries)
        parts = []
        for i in range(last, -1, -1):
            model = self.load(i) if i != last else model
            dyn = self.fit_segment(i, model)
            parts.append((i, self._score(self.attributor(model, "identity"), i, dyn.respond(v), per_layer)))
            if i:
                v = dyn.carry(v)
        self.cost["seconds"] += time.perf_counter() - t0
        meta = {"method": "source", "segments": [s.spec() for s in self.segments], "strategy": self.strategy}
        return self._assemble(parts, len(queries), per_layer, meta)

    def tracin(self, queries: Any, curvature: str = "identity", damping: float | None = None) -> Scores:
        """TracIn-CP baselines: per checkpoint, query and training gradients both at theta_l.

        ``curvature="identity"``: ``sum_l t_l <grad f_q(theta_l), grad L_m(theta_l)>`` with t_l the
        segment's learning-rate sum (TracIn-CP). Any other strategy ("ekfac", ...): the sum over
        checkpoints of that strategy's influence at ``damping`` (None: the paper's rule), an
        ensemble of influence functions. A sequence scores only in segments whose data held it.
        """
        queries = check_data(queries, "queries")
        check_choice(curvature, "curvature", ("identity", "diagonal", "kfac", "ekfac"))
        t0 = time.perf_counter()
        parts = []
        for i in range(len(self.segments)):
            an = self.attributor(self.load(i), curvature)
            if curvature != "identity":
                an.fit(self.segment_data(i), self.batch_size)
                self.cost["fit_passes"] += 2 if curvature == "ekfac" else 1
            qg = an.query_gradients(queries, self.batch_size, damping=damping)
            self.cost["query_passes"] += 1
            weight = self.horizon(i) if curvature == "identity" else 1.0
            pre = {n: weight * q.full.double() for n, q in qg.items()}
            parts.append((i, self._score(an, i, pre, False)))
        self.cost["seconds"] += time.perf_counter() - t0
        meta = {"method": f"tracin-{curvature}", "segments": [s.spec() for s in self.segments]}
        return self._assemble(parts, len(queries), False, meta)
