"""The one capture mechanism: layer inputs ``a`` and output gradients ``g`` per tracked layer.

Every phase of headwater (covariance, eigenvalue correction, query gradients, scores,
self-influence) is a consumer of the stream this module produces::

    with Capture(model, layers) as cap:
        loss = task.loss(model, batch, sample=True)        # forward: hooks record inputs
        for c in cap.backward(loss, mask):                  # backward: autograd.grad
            c.name, c.a, c.g, c.mask                        # [N,S,I], [N,S,O], [N,S]

Why ``torch.autograd.grad`` on the layer outputs instead of ``loss.backward()``: we only
need ``g = dL/dy`` at each tracked layer, so asking autograd for exactly those tensors skips
every weight-gradient GEMM and never touches ``.grad`` on the user's parameters. That is
roughly a third of a training step's FLOPs saved on every pass.

Hooks are registered in this file and nowhere else; no state is left on the user's modules.
A module called several times in one forward pass (shared weights) contributes all its calls,
concatenated along the token axis S, so its gradient is the sum over uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import LayerAdapter

__all__ = ["Capture", "LayerCapture", "per_example_grads"]


def per_example_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a [N,S,I], g [N,S,O] -> per-example gradients [N,O,I] = sum_s g a^T.

    Materialize these only where the [O, I] per-example form is the cheaper one (diagonal
    curvature, dense scoring of short sequences); scoring and EK-FAC otherwise contract the
    factored form directly.
    """
    return torch.einsum("nso,nsi->noi", g, a)


@dataclass
class LayerCapture:
    """What one tracked layer saw in one batch.

    a: inputs with bias column, [N, S, I]; g: output gradients, [N, S, O];
    mask: bool [N, S], the tokens whose outputs are scored (None = all tokens).
    calls: how many calls of the module were concatenated along S (2 for a layer used twice).
    The per-example gradient of the loss w.r.t. the canonical weight is ``sum_s g a^T``.
    """

    name: str
    a: torch.Tensor
    g: torch.Tensor
    mask: torch.Tensor | None
    calls: int = 1


class Capture:
    """Context manager that records tracked layers' inputs and outputs during a forward pass.

    Use one ``Capture`` for many batches: ``backward`` consumes and clears what the forward
    recorded. Within the context, tracked weights are made to require grad (so their outputs
    are differentiable even in a frozen model); the flags are restored on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, LayerAdapter]):
        self.model = model
        self.layers = layers
        self._modules = {name: model.get_submodule(name) for name in layers}
        self._calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles: list = []
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
            for p in self.layers[name].parameters(module):
                self._flags.append((p, p.requires_grad))
                p.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._handles.clear()
        self._flags.clear()
        self._calls.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):  # pragma: no cover - Linear/Conv1D only
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            self._calls.setdefault(name, []).append((inputs[0].detach(), output))

        return hook

    def clear(self) -> None:
        """Forget the current forward pass (e.g. after an exception)."""
        self._calls.clear()

    def backward(
        self,
        loss: torch.Tensor,
        mask: torch.Tensor | None = None,
        retain_graph: bool = False,
    ) -> Iterator[LayerCapture]:
        """Differentiate ``loss`` w.r.t. every recorded layer output and yield one
        ``LayerCapture`` per tracked layer, in registration order.

        ``retain_graph=True`` keeps the forward's records for another backward on the same
        graph (several pseudo-losses per forward pass).
        """
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not depend on any tracked layer; check that the task's loss "
                "runs the model, and that it is not computed under torch.no_grad()"
            )
        missing = [n for n in self.layers if n not in self._calls]
        if missing:
            raise RuntimeError(
                f"tracked layers {missing[:5]} were not called in the forward pass; "
                "choose modules that the task's loss actually uses"
            )
        names = list(self.layers)
        outputs = [y for n in names for _, y in self._calls[n]]
        grads = torch.autograd.grad(loss, outputs, retain_graph=retain_graph, allow_unused=True)
        calls = self._calls
        if not retain_graph:
            self._calls = {}
        k = 0
        for name in names:
            adapter = self.layers[name]
            a_parts, g_parts = [], []
            for x, y in calls[name]:
                gy = grads[k]
                k += 1
                dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                gy = torch.zeros_like(y, dtype=dtype) if gy is None else gy.to(dtype)
                x, gy = _to_sequences(x, mask, name), _to_sequences(gy, mask, name)
                a_parts.append(adapter.flatten_input(x.to(dtype)))
                g_parts.append(adapter.flatten_output(gy))
            a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)
            g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, dim=1)
            yield LayerCapture(name, a, g, _layer_mask(mask, a.shape[1], len(a_parts), name), len(a_parts))


def _to_sequences(x: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """A layer input or output gradient with the batch's sequences as its leading axis.

    Some models run their MLP on the hidden states flattened to [N*S, d] (OPT's fc1/fc2, the
    shared experts of Qwen2-MoE): those rows are mapped back to [N, S, d]. A leading axis that is
    neither N nor N*S cannot be mapped to sequences, and attributing through it would mix
    examples, so it is an error naming the layer.
    """
    if mask is None:
        return x
    n, s0 = mask.shape
    if x.shape[0] == n:
        return x
    if x.dim() == 2 and x.shape[0] == n * s0:
        return x.reshape(n, s0, x.shape[1])
    raise ValueError(
        f"layer {name!r} ran on a tensor of shape {tuple(x.shape)}, whose leading axis is neither the batch "
        f"({n} sequences) nor its {n * s0} tokens, so headwater cannot tell which sequence each row belongs to; "
        "leave this layer out of modules"
    )


def _layer_mask(mask: torch.Tensor | None, s: int, n_calls: int, name: str) -> torch.Tensor | None:
    """Map the task's token mask [N, S0] onto a layer's token axis of length ``s``.

    A layer called ``k`` times on the sequence sees k*S0 tokens; a layer applied once per
    sequence (pooled features: one position) counts the sequences that have a scored token.
    Any other length does not line up with the tokens: an error, never a silently dropped mask.
    """
    if mask is None:
        return None
    s0 = mask.shape[1]
    if s == s0:
        return mask
    if s == s0 * n_calls:
        return mask.repeat(1, n_calls)
    if s == n_calls:
        return mask.any(dim=1, keepdim=True).repeat(1, n_calls)
    raise ValueError(
        f"layer {name!r} has {s} positions per sequence over {n_calls} call(s), which does not line up with the "
        f"batch's {s0} tokens, so its scored tokens are unknown; leave this layer out of modules"
    )
