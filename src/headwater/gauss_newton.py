"""Matrix-free Gauss-Newton products over *all* tracked parameters, for the baselines and for refinement.

The engine approximates the Gauss-Newton matrix G block-diagonally per layer. The evaluation
baselines (LiSSA, PBRF, the dense "exact" reference) need the real thing, cross-layer blocks
included, so this module works on one flat parameter vector that concatenates every tracked
layer's canonical [O, I] matrix (bias as the last input column), in the engine's layer order.
That is the same layout as ``Attributor.curvature`` and scores, so results line up.

``G v = (1/N) sum_m J_m^T H_m J_m v``, where ``J_m`` is the Jacobian of the model's output for
example m with respect to the parameters and ``H_m`` is the Hessian of the task loss with
respect to that output. We get ``H_m`` from the task itself, by handing ``task.loss`` a stand-in
model that returns a fixed output tensor, so any task that computes its loss from the model's
output works without extra code. ``J v`` is a forward-mode product (``torch.func.jvp``) and
``J^T u`` a reverse-mode one (``torch.func.vjp``), vmapped over many vectors at once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .adapters import LayerAdapter
from .data import iter_batches
from .engine import Capture, per_example_grads
from .task import IGNORE, ClassificationTask, LanguageModelingTask, RegressionTask, Task, model_logits

__all__ = [
    "ParameterSpace",
    "cast_batch",
    "model_output",
    "output_loss",
    "precise_loss",
    "precise_measurement",
    "gauss_newton_product",
    "dense_gauss_newton",
    "layer_gradients",
    "stream_scores",
    "eval_mode",
    "differentiable_attention",
]


class ParameterSpace:
    """The tracked layers' parameters viewed as canonical [O, I] blocks or one flat vector.

    ``to_params``/``from_params`` convert between canonical blocks (with any leading batch
    dimensions) and the ``{"layer.weight": ..., "layer.bias": ...}`` dict that
    ``torch.func.functional_call`` takes. Only the adapters' ``kind`` and ``has_bias`` are
    used, so ``nn.Linear`` and HF ``Conv1D`` both work.
    """

    def __init__(self, model: nn.Module, layers: dict[str, LayerAdapter]):
        experts = [n for n, ad in layers.items() if ad.kind == "expert"]
        if experts:
            raise ValueError(
                f"layer {experts[0]!r} is one expert's slice of a fused MoE parameter; exact Gauss-Newton products "
                "(refine_steps, LiSSA, PBRF) need whole parameters, so leave the experts out of modules for these"
            )
        self.model = model
        self.layers = layers
        self.shapes = {n: (ad.out_features, ad.in_features) for n, ad in layers.items()}
        self.sizes = {n: o * i for n, (o, i) in self.shapes.items()}
        self.size = sum(self.sizes.values())

    def params(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model's current tracked parameters, detached, keyed for ``functional_call``."""
        out = {}
        for name, ad in self.layers.items():
            module = self.model.get_submodule(name)
            out[f"{name}.weight"] = module.weight.detach()
            if ad.has_bias:
                out[f"{name}.bias"] = module.bias.detach()
        return {k: v.to(dtype) if dtype is not None else v for k, v in out.items()}

    def to_params(self, blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical blocks [..., O, I] -> parameter-shaped tensors [..., *param.shape]."""
        out = {}
        for name, ad in self.layers.items():
            c = blocks[name]
            w = c[..., : ad.in_features - int(ad.has_bias)]
            out[f"{name}.weight"] = w.mT if ad.kind == "conv1d" else w
            if ad.has_bias:
                out[f"{name}.bias"] = c[..., -1]
        return out

    def from_params(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameter-shaped tensors [..., *param.shape] -> canonical blocks [..., O, I]."""
        out = {}
        for name, ad in self.layers.items():
            w = tensors[f"{name}.weight"]
            w = w.mT if ad.kind == "conv1d" else w
            if ad.has_bias:
                w = torch.cat([w, tensors[f"{name}.bias"].unsqueeze(-1)], dim=-1)
            out[name] = w
        return out

    def flatten(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Canonical blocks [..., O, I] -> flat [..., P] in layer order."""
        return torch.cat([blocks[n].flatten(-2) for n in self.layers], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat [..., P] -> canonical blocks [..., O, I]."""
        out, lo = {}, 0
        for name, (o, i) in self.shapes.items():
            out[name] = flat[..., lo : lo + o * i].unflatten(-1, (o, i))
            lo += o * i
        return out


class _Call:
    """Stands in for the model inside ``task.loss``: calls it with given parameters, keeps the output."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor] | None):
        self.model, self.params, self.output = model, params, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.params is None:
            out = self.model(*args, **kwargs)
        else:
            out = functional_call(self.model, self.params, args, kwargs)
        self.output = model_logits(out)
        return out


class _Fixed:
    """Stands in for the model inside ``task.loss``: returns a given output tensor."""

    def __init__(self, output: torch.Tensor):
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


def model_output(
    model: nn.Module, task: Task, batch: Any, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The output tensor (logits) that ``task.loss`` computes its loss from.

    Found by running ``task.loss`` once with a recording stand-in, so we call the model exactly
    as the task does (positional inputs, HF keyword arguments, ...).
    """
    call = _Call(model, params)
    task.loss(call, batch, sample=False)
    if call.output is None:
        raise ValueError(f"{type(task).__name__}.loss never called the model; the baselines need a loss of its output")
    return call.output


def _builtin(task: Task, cls: type, method: str) -> bool:
    return isinstance(task, cls) and getattr(type(task), method) is getattr(cls, method)


def precise_loss(task: Task, model: Any, batch: Any) -> torch.Tensor:
    """``task.loss(model, batch)``, but keeping float64 for the built-in tasks.

    The built-in classification and language-modelling losses call ``logits.float()``, which
    casts float64 down to float32. PBRF measures responses of order 1/N, so it runs in float64
    and re-implements those two losses (same formula, input dtype kept). Custom tasks are
    called as they are.
    """
    if _builtin(task, ClassificationTask, "loss"):
        inputs, targets = task._split(batch)
        return F.cross_entropy(model_logits(model(inputs)), targets, reduction="sum")
    if _builtin(task, LanguageModelingTask, "loss"):
        logits, targets = task._forward(model, batch)
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return task.loss(model, batch, sample=False)


def precise_measurement(task: Task, model: Any, batch: Any) -> torch.Tensor:
    """``task.measurement``, in float64 for the built-in tasks (whose measurement is the loss)."""
    for cls in (ClassificationTask, LanguageModelingTask, RegressionTask):
        if _builtin(task, cls, "measurement"):
            return precise_loss(task, model, batch)
    return task.measurement(model, batch)


def output_loss(task: Task, batch: Any, output: torch.Tensor) -> torch.Tensor:
    """The task loss as a function of the model output alone (labels from ``batch``)."""
    return precise_loss(task, _Fixed(output), batch)


def gauss_newton_product(
    model: nn.Module, task: Task, space: ParameterSpace, batch: Any, vectors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``sum_m J_m^T H_m J_m v`` over the batch's examples, for K vectors at once.

    vectors: canonical blocks [K, O, I] per layer -> the same shape. Summed, not averaged:
    divide by the batch size for the per-example mean G.

    Runs under ``torch.no_grad``: the function transforms still differentiate with respect to
    ``params``, but the model's *untracked* parameters (embeddings, layer norms) no longer
    attach an ordinary autograd graph to the result, which LiSSA would otherwise chain across
    all its iterations (gigabytes on the demo GPT-2).
    """
    params = space.params()
    dtype = next(iter(params.values())).dtype
    vectors = {n: v.to(dtype) for n, v in vectors.items()}
    out = lambda p: model_output(model, task, batch, p)  # noqa: E731
    with torch.no_grad():
        y, pullback = vjp(out, params)
        jv = vmap(lambda t: jvp(out, (params,), (t,))[1])(space.to_params(vectors))  # [K, *y]
        dloss = grad(lambda o: output_loss(task, batch, o))
        hjv = vmap(lambda u: jvp(dloss, (y,), (u,))[1])(jv)  # [K, *y]
        (back,) = vmap(pullback)(hjv)
    return {n: t.detach() for n, t in space.from_params(back).items()}


def dense_gauss_newton(
    model: nn.Module, task: Task, space: ParameterSpace, data: Any, batch_size: int = 64, chunk: int = 256
) -> torch.Tensor:
    """The full [P, P] per-example mean Gauss-Newton matrix in float64 (small models only).

    Costs P/chunk matrix-free products per batch; P = a few thousand is fine on a CPU. Runs on
    a float64 copy of the model, so the user's model is untouched.
    """
    model = copy.deepcopy(model).double()
    space = ParameterSpace(model, space.layers)
    n = len(data)
    g = torch.zeros(space.size, space.size, dtype=torch.float64)
    eye = torch.eye(space.size, dtype=torch.float64)
    with eval_mode(model), differentiable_attention(model):
        for _, batch in iter_batches(data, task, batch_size, "training data"):
            batch = cast_batch(batch, torch.float64)
            for lo in range(0, space.size, chunk):
                cols = space.unflatten(eye[lo : lo + chunk])
                g[lo : lo + chunk] += space.flatten(gauss_newton_product(model, task, space, batch, cols))
    return (g + g.T) / (2 * n)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration (as in the engine's passes), restoring the previous mode."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def differentiable_attention(model: nn.Module) -> Iterator[None]:
    """Switch a HF model to eager attention for the duration.

    PyTorch's fused CPU attention kernel has no forward-mode derivative, which ``jvp`` needs;
    the eager implementation computes the same function with ordinary ops.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(impl)


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in a (nested) batch to ``dtype``; integer tensors untouched."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(v, dtype) for v in batch)
    return batch


def layer_gradients(
    model: nn.Module, task: Task, layers: dict[str, LayerAdapter], data: Any, batch_size: int, measurement: bool = False
) -> dict[str, torch.Tensor]:
    """Per-example gradients [N, O, I] per layer of the loss (or the measurement), via the engine's capture."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    fn = task.measurement if measurement else (lambda m, b: task.loss(m, b, sample=False))
    with eval_mode(model), Capture(model, layers) as cap:
        for _, batch in iter_batches(data, task, batch_size, "queries" if measurement else "training data"):
            batch = task.to_device(batch, _device(model))
            for c in cap.backward(fn(model, batch), task.token_mask(batch)):
                parts[c.name].append(per_example_grads(c.a, c.g))
    return {n: torch.cat(p) for n, p in parts.items()}


def stream_scores(
    model: nn.Module,
    task: Task,
    layers: dict[str, LayerAdapter],
    preconditioned: dict[str, torch.Tensor],
    train: Any,
    batch_size: int,
) -> torch.Tensor:
    """``sum_layers <P_q, grad L_m>`` for given preconditioned query gradients P [Q, O, I]: scores [Q, N].

    The training side is streamed through the engine's capture, batch by batch, exactly as in
    ``Attributor.scores``, so the convention (positive = upweighting m lowers f_q) is shared.
    """
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32  # the capture's
    p = {n: t.to(dtype) for n, t in preconditioned.items()}
    q = next(iter(p.values())).shape[0]
    values = torch.zeros(q, len(train), dtype=torch.float64)
    with eval_mode(model), Capture(model, layers) as cap:
        for lo, batch in iter_batches(train, task, batch_size, "training data"):
            batch = task.to_device(batch, _device(model))
            for c in cap.backward(task.loss(model, batch, sample=False), task.token_mask(batch)):
                dw = per_example_grads(c.a, c.g)  # [N, O, I]
                sc = torch.einsum("qoi,noi->qn", p[c.name].to(dw.device), dw)
                values[:, lo : lo + dw.shape[0]] += sc.double().cpu()
    return values


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
