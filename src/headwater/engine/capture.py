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

Token axes. A layer's rows are mapped back to the batch's sequences: [N, S, d] as it is, the
token-flattened [N*S, d] of OPT's fc1/fc2 and Qwen2-MoE's shared expert reshaped, a pooled
[N, d] (a classifier head) as one position per sequence. The mask of each call is the mask of
the token axis its length matches: one axis for a decoder or an encoder, two for an
encoder-decoder (``task.TokenMasks``: encoder layers and cross-attention keys/values see the
source, the rest of the decoder the target). A length that matches no axis is an error naming
the layer, never a silently misaligned mask.

Fused MoE experts (``headwater.experts``): one forward hook on the fused module recomputes it
expert by expert and records, per tracked expert projection, the routed rows. At backward they
are packed per sequence: expert e's capture is [N, S_e, I] with S_e the most tokens any one
sequence routed to e, zero-padded and masked, so memory follows the routed tokens and not
experts x tokens. ``LayerCapture.positions`` says which token each packed position is, so
per-token scores can be folded back onto the sequence (``LayerCapture.fold_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import LayerAdapter
from ..experts import ExpertAdapter, check_recomputed, forward_per_expert, routing_args
from ..task import TokenMasks

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
    positions: long [N, S], the token of the sequence each position is (-1: padding), over
    ``seq_len`` tokens; None when the S axis is simply ``calls`` repeats of the sequence's tokens.
    The per-example gradient of the loss w.r.t. the canonical weight is ``sum_s g a^T``.
    """

    name: str
    a: torch.Tensor
    g: torch.Tensor
    mask: torch.Tensor | None
    calls: int = 1
    positions: torch.Tensor | None = None
    seq_len: int | None = None

    def fold_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values [..., N, S] -> per-token values [..., N, T] on the sequence's tokens.

        Sums a module's repeated calls, scatters an expert's packed positions back to their tokens,
        places an encoder-decoder's source tokens before its target tokens, and puts a pooled
        layer (one position per sequence, e.g. a classifier head on [CLS]) on the first token.
        Padding positions are dropped; so the per-token values always sum to the per-layer ones.
        """
        if self.positions is None:
            return values.reshape(*values.shape[:-1], self.calls, -1).sum(-2)
        index = torch.where(self.positions < 0, self.seq_len, self.positions).expand_as(values)
        out = values.new_zeros(*values.shape[:-1], self.seq_len + 1)
        return out.scatter_add_(-1, index, values)[..., : self.seq_len]


@dataclass
class _Call:
    """One recorded call: input x and output y (in the graph); for an expert, its routed ``rows``
    among the call's ``total`` token rows (y is None when no token was routed to it)."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    rows: torch.Tensor | None = None
    total: int = 0
    dtype: torch.dtype | None = None  # of the fused module's hidden states (x may be None)


@dataclass
class _Axis:
    """One token axis of the batch: its length, where its tokens start in per-token scores, its mask."""

    length: int
    offset: int
    mask: torch.Tensor


@dataclass
class _Part:
    a: torch.Tensor
    g: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor | None  # None: the part is the single axis's tokens in order


class Capture:
    """Context manager that records tracked layers' inputs and outputs during a forward pass.

    Use one ``Capture`` for many batches: ``backward`` consumes and clears what the forward
    recorded. Within the context, tracked weights are made to require grad (so their outputs
    are differentiable even in a frozen model); the flags are restored on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, LayerAdapter]):
        self.model = model
        self.layers = layers
        self._owners: dict[str, list[str]] = {}  # module name -> the tracked layers it carries
        for name, adapter in layers.items():
            self._owners.setdefault(adapter.owner(name), []).append(name)
        self._modules = {owner: model.get_submodule(owner) for owner in self._owners}
        self._calls: dict[str, list[_Call]] = {}
        self._handles: list = []
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        seen: set[int] = set()
        for owner, names in self._owners.items():
            module = self._modules[owner]
            if isinstance(self.layers[names[0]], ExpertAdapter):
                self._handles.append(module.register_forward_hook(self._experts_hook(owner, names), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._hook(names[0])))
            for name in names:
                for p in self.layers[name].parameters(module):
                    if id(p) not in seen:  # a fused parameter is shared by all its experts: record it once
                        seen.add(id(p))
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
        adapter = self.layers[name]

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            y = adapter.output(output, name)
            adapter.verify(module, inputs[0], y, name)
            self._calls.setdefault(name, []).append(_Call(inputs[0].detach(), y))

        return hook

    def _experts_hook(self, owner: str, names: list[str]):
        """Recompute a fused experts module per expert; its output keeps the fused values, its gradient
        flows through the recomputation (see ``headwater.experts``)."""
        tracked = {(self.layers[n].expert, self.layers[n].proj): n for n in names}
        keep = {e for e, _ in tracked}

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None  # nothing will be differentiated: leave the fused forward alone
            hidden, index, weights = routing_args(module, args, kwargs, owner)
            recomputed, routed = forward_per_expert(module, hidden, index, weights, owner, keep)
            check_recomputed(module, recomputed, output, owner)
            for (e, proj), name in tracked.items():
                r = routed[e]
                call = _Call(r.inputs.get(proj), r.outputs.get(proj), r.rows, hidden.shape[0], hidden.dtype)
                self._calls.setdefault(name, []).append(call)
            return output.detach() + (recomputed - recomputed.detach())

        return hook

    def clear(self) -> None:
        """Forget the current forward pass (e.g. after an exception)."""
        self._calls.clear()

    def backward(
        self,
        loss: torch.Tensor,
        mask: torch.Tensor | TokenMasks | None = None,
        retain_graph: bool = False,
    ) -> Iterator[LayerCapture]:
        """Differentiate ``loss`` w.r.t. every recorded layer output and yield one
        ``LayerCapture`` per tracked layer, in registration order.

        ``mask`` is the task's ``token_mask(batch)``: [N, S] bool, or ``TokenMasks`` for a model
        with several token axes. ``retain_graph=True`` keeps the forward's records for another
        backward on the same graph (several pseudo-losses per forward pass).
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
        outputs = [c.y for n in names for c in self._calls[n] if c.y is not None]
        grads = iter(torch.autograd.grad(loss, outputs, retain_graph=retain_graph, allow_unused=True))
        calls = self._calls
        if not retain_graph:
            self._calls = {}
        axes = _axes(mask)
        for name in names:
            adapter = self.layers[name]
            parts = []
            for call in calls[name]:
                gy = next(grads) if call.y is not None else None
                if call.rows is not None:
                    parts.append(_routed_part(adapter, call, gy, axes, name))
                else:
                    parts.append(_dense_part(adapter, call, gy, axes, mask, name))
            yield _join(name, parts, axes)


def _dtype(dtype: torch.dtype) -> torch.dtype:
    """Captures are float64 for a float64 model and float32 otherwise (half precision is widened)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axes(mask: torch.Tensor | TokenMasks | None) -> list[_Axis] | None:
    if mask is None:
        return None
    masks = mask.axes if isinstance(mask, TokenMasks) else (mask,)
    out, offset = [], 0
    for m in masks:
        out.append(_Axis(m.shape[1], offset, m))
        offset += m.shape[1]
    return out


def _scored_axis(mask: torch.Tensor | TokenMasks) -> torch.Tensor:
    return mask.axes[mask.scored] if isinstance(mask, TokenMasks) else mask


def _dense_part(
    adapter: LayerAdapter,
    call: _Call,
    gy: torch.Tensor | None,
    axes: list[_Axis] | None,
    mask: torch.Tensor | TokenMasks | None,
    name: str,
) -> _Part:
    x, y = call.x, call.y
    dtype = _dtype(x.dtype)
    gy = torch.zeros_like(y, dtype=dtype) if gy is None else gy.to(dtype)
    x, gy = _to_sequences(x, axes, name), _to_sequences(gy, axes, name)
    a, g = adapter.flatten_input(x.to(dtype)), adapter.flatten_output(gy)
    if axes is None:
        return _Part(a, g, None, None)
    n, s = a.shape[:2]
    total = axes[-1].offset + axes[-1].length
    axis = next((ax for ax in axes if ax.length == s), None)
    if axis is not None:
        single = axis.offset == 0 and axis.length == total
        positions = None if single else (axis.offset + torch.arange(s, device=a.device)).expand(n, s)
        return _Part(a, g, axis.mask, positions)
    if s == 1:  # applied once per sequence (pooled features): counts when the sequence is scored at all
        first = torch.zeros(n, 1, dtype=torch.long, device=a.device)
        return _Part(a, g, _scored_axis(mask).any(dim=1, keepdim=True), first)
    lengths = " or ".join(str(ax.length) for ax in axes)
    raise ValueError(
        f"layer {name!r} has {s} positions per sequence in one call, which does not line up with the batch's "
        f"{lengths} tokens, so its scored tokens are unknown; leave this layer out of modules"
    )


def _routed_part(
    adapter: LayerAdapter, call: _Call, gy: torch.Tensor | None, axes: list[_Axis] | None, name: str
) -> _Part:
    """An expert's routed rows packed per sequence: [N, S_e, *], S_e = the most rows of one sequence."""
    if axes is None:
        raise ValueError(
            f"layer {name!r} is an expert of a fused MoE module, and without the task's token_mask headwater "
            "cannot tell which sequence each routed token belongs to; give the task a token_mask(batch)"
        )
    n = axes[0].mask.shape[0]
    axis = next((ax for ax in axes if ax.length * n == call.total), None)
    if axis is None:
        lengths = " or ".join(str(n * ax.length) for ax in axes)
        raise ValueError(
            f"layer {name!r} ran on {call.total} token rows, not the batch's {lengths}, so headwater cannot tell "
            "which sequence each routed token belongs to; leave this layer out of modules"
        )
    device, i, o = axis.mask.device, adapter.in_features, adapter.out_features
    rows, dtype = call.rows, _dtype(call.dtype)
    if rows.numel() == 0:  # no token of the batch was routed to this expert: one empty, unscored position
        a = torch.zeros(n, 1, i, dtype=dtype, device=device)
        empty = torch.zeros(n, 1, dtype=torch.bool, device=device)
        return _Part(a, a.new_zeros(n, 1, o), empty, torch.full((n, 1), -1, dtype=torch.long, device=device))
    x = adapter.flatten_input(call.x.to(dtype))
    g = torch.zeros_like(call.y, dtype=dtype) if gy is None else gy.to(dtype)
    seq, tok = rows // axis.length, rows % axis.length  # rows ascending, so sequences are too
    counts = torch.bincount(seq, minlength=n)
    width = int(counts.max())  # one device sync per expert layer and batch
    slot = torch.arange(rows.numel(), device=device) - (counts.cumsum(0) - counts)[seq]
    a_packed = x.new_zeros(n, width, i)
    a_packed[seq, slot] = x
    g_packed = g.new_zeros(n, width, o)
    g_packed[seq, slot] = g
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    mask[seq, slot] = axis.mask[seq, tok]
    positions = torch.full((n, width), -1, dtype=torch.long, device=device)
    positions[seq, slot] = axis.offset + tok
    return _Part(a_packed, g_packed, mask, positions)


def _join(name: str, parts: list[_Part], axes: list[_Axis] | None) -> LayerCapture:
    """Concatenate a layer's calls along S; positions only where the S axis is not the plain token axis."""
    cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)  # noqa: E731
    a, g = cat([p.a for p in parts]), cat([p.g for p in parts])
    mask = None if axes is None else cat([p.mask for p in parts])
    if all(p.positions is None for p in parts):
        return LayerCapture(name, a, g, mask, len(parts))
    n = a.shape[0]
    plain = lambda p: torch.arange(p.a.shape[1], device=a.device).expand(n, -1)  # noqa: E731
    positions = cat([p.positions if p.positions is not None else plain(p) for p in parts])
    return LayerCapture(name, a, g, mask, len(parts), positions, axes[-1].offset + axes[-1].length)


def _to_sequences(x: torch.Tensor, axes: list[_Axis] | None, name: str) -> torch.Tensor:
    """A layer input or output gradient with the batch's sequences as its leading axis.

    Some models run their MLP on the hidden states flattened to [N*S, d] (OPT's fc1/fc2, the
    shared experts of Qwen2-MoE): those rows are mapped back to [N, S, d]. A leading axis that is
    neither N nor N*S cannot be mapped to sequences, and attributing through it would mix
    examples, so it is an error naming the layer.
    """
    if axes is None:
        return x
    n = axes[0].mask.shape[0]
    if x.shape[0] == n:
        return x
    for ax in axes:
        if x.dim() == 2 and x.shape[0] == n * ax.length:
            return x.reshape(n, ax.length, x.shape[1])
    tokens = " or ".join(str(n * ax.length) for ax in axes)
    raise ValueError(
        f"layer {name!r} ran on a tensor of shape {tuple(x.shape)}, whose leading axis is neither the batch "
        f"({n} sequences) nor its {tokens} tokens, so headwater cannot tell which sequence each row belongs to; "
        "leave this layer out of modules"
    )
