"""The one capture mechanism: layer inputs ``a`` and output gradients ``g`` per tracked layer.

Every phase of headwater (covariance, eigenvalue correction, query gradients, scores,
self-influence) is a consumer of the stream this module produces::

    with Capture(model, layers) as cap:
        loss = task.loss(model, batch, sample=True)        # forward: hooks record inputs
        cap.stream(loss, mask, consume)                     # backward: consume(c) per layer, as it comes
        # c.name, c.a, c.g, c.mask                          # [N,S,I], [N,S,O], [N,S]

Streaming. A plain backward frees each layer's saved activations as soon as its node has run;
a capture that waited for every layer's output gradient would hold all of them (and all
``a``, ``g``) at once, a cost that grows with the number of tracked layers. So each recorded
output gets a tensor hook that fires the moment its gradient exists, *before* its layer's
backward node runs; once every call of the layer is in, the hook builds the layer's
``LayerCapture``, hands it to ``consume`` and drops it (and the recorded input), and autograd
then frees the layer's activations as in a training step. At any time at most one layer's
capture is alive (plus, for a module called several times, its calls' gradients until the last
one arrives). Layers therefore arrive in backward order; ``backward`` collects them for callers
that want a list.

Why autograd still computes no weight gradient and never touches ``.grad``: a forward pre-hook
passes each tracked module's input through ``_Tap``, an identity that also depends on a
zero-dimensional *anchor* leaf, and the backward is ``torch.autograd.grad(loss, anchor)``. Autograd
runs exactly the nodes on a path from the loss to a tap, i.e. everything above the lowest
tracked layers, and each layer's output-gradient hook fires on the way; the weights'
``AccumulateGrad`` nodes are never needed, so the weight-gradient GEMMs are skipped (a third of a
training step's FLOPs), and the anchor's own gradient is None by construction. The price is one
input-gradient GEMM for the lowest tracked layer(s), which a ``grad`` w.r.t. the outputs skipped.
The tap returns its input as is (a view), so forward values are bit for bit the model's.

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
expert by expert (from its tapped hidden states) and records, per tracked expert projection,
the routed rows. When their gradients are in they are packed per sequence: expert e's capture is
[N, S_e, I] with S_e the most tokens any one sequence routed to e, zero-padded and masked, so
memory follows the routed tokens and not experts x tokens. ``LayerCapture.positions`` says which
token each packed position is, so per-token scores can be folded back onto the sequence
(``LayerCapture.fold_tokens``).

Consumers get views of autograd's own buffers (the gradient that flows on to the layers below,
the input the layer saved for its backward): they must read them, never write them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    """One recorded call: its detached input ``x`` and what its output ``y`` looked like.

    The output itself is not kept: holding it would keep an activation alive that a training
    step frees right after the forward (a projection's output that only a residual add reads).
    ``grad_fn`` is the output's node (None: no gradient can come, e.g. an expert no token was
    routed to, whose ``shape`` is None too); for an expert, its routed ``rows`` among the call's
    ``total`` token rows, and ``dtype`` the fused module's hidden-state dtype.
    """

    x: torch.Tensor | None
    shape: torch.Size | None
    device: torch.device | None
    grad_fn: object = None
    rows: torch.Tensor | None = None
    total: int = 0
    dtype: torch.dtype | None = None  # of the fused module's hidden states (x may be None)

    def zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """The output gradient of a call that got none (its output does not reach the loss)."""
        return torch.zeros(self.shape, dtype=dtype, device=self.device)


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


class _Tap(torch.autograd.Function):
    """Identity on a tracked module's input that also depends on the capture's anchor leaf.

    ``grad(loss, anchor)`` then has to run every node between the loss and a tap, which is what
    makes each tracked output's gradient hook fire, while nothing needs a weight's gradient. The
    anchor's gradient is None: no tensor is made for it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        return x  # returned as is: autograd makes it a view, so no copy and the same values

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        return grad, None


class _Stream:
    """One backward pass in progress: output gradients as they arrive, layers consumed when complete.

    ``expected[name]``: how many of the layer's calls will get a gradient in this backward; when
    that many have arrived the layer is built and consumed, and its records are dropped unless
    ``keep`` (another backward on the same graph follows).
    """

    def __init__(
        self,
        calls: dict[str, list[_Call]],
        layers: dict[str, LayerAdapter],
        mask: torch.Tensor | TokenMasks | None,
        consume: Callable[[LayerCapture], None] | None,
        keep: bool,
        expected: dict[str, int],
    ):
        self.calls, self.layers, self.mask, self.axes = calls, layers, mask, _axes(mask)
        self.consume, self.keep, self.expected = consume, keep, expected
        self.grads: dict[str, dict[int, torch.Tensor]] = {}
        self.done: set[str] = set()

    def arrive(self, name: str, index: int, grad: torch.Tensor) -> None:
        if name in self.done:  # pragma: no cover - expected[] counts every call that can get a gradient
            raise RuntimeError(f"layer {name!r} got a gradient after it was consumed; please report this")
        got = self.grads.setdefault(name, {})
        got[index] = grad
        if len(got) == self.expected[name]:
            self.finish(name)

    def finish(self, name: str) -> None:
        """Build the layer's capture from what arrived (zeros for calls that got no gradient), consume it."""
        got = self.grads.pop(name, {})
        self.done.add(name)
        calls = self.calls[name] if self.keep else self.calls.pop(name)
        if self.consume is None:
            return
        adapter, parts = self.layers[name], []
        for i, call in enumerate(calls):
            gy = got.pop(i, None)
            if call.rows is not None:
                parts.append(_routed_part(adapter, call, gy, self.axes, name))
            else:
                parts.append(_dense_part(adapter, call, gy, self.axes, self.mask, name))
        del calls, got  # once consumed, nothing here outlives the capture
        capture = _join(name, parts, self.axes)
        del parts
        self.consume(capture)

    def finish_rest(self, order: list[str]) -> None:
        """Layers whose calls did not all get a gradient (unused by this loss): with zeros, in model order."""
        for name in order:
            if name not in self.done:
                self.finish(name)


class Capture:
    """Context manager that records tracked layers' inputs during a forward pass and streams
    ``(a, g)`` per layer out of the backward (``stream``).

    Use one ``Capture`` for many batches: ``stream`` consumes and clears what the forward
    recorded. Within the context, tracked weights are made to require grad (so their layers'
    inputs are saved for the backward, as in training, even in a frozen model); the flags are
    restored on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, LayerAdapter]):
        self.model = model
        self.layers = layers
        self._owners: dict[str, list[str]] = {}  # module name -> the tracked layers it carries
        for name, adapter in layers.items():
            self._owners.setdefault(adapter.owner(name), []).append(name)
        self._modules = {owner: model.get_submodule(owner) for owner in self._owners}
        self._calls: dict[str, list[_Call]] = {}
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._run: _Stream | None = None
        self._handles: list = []
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        seen: set[int] = set()
        for owner, names in self._owners.items():
            module = self._modules[owner]
            if isinstance(self.layers[names[0]], ExpertAdapter):
                self._handles.append(module.register_forward_hook(self._experts_hook(owner, names), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_pre_hook(self._tap_hook))
                self._handles.append(module.register_forward_hook(self._hook(names[0])))
            for name in names:
                for p in self.layers[name].parameters(module):
                    if id(p) not in seen:  # a fused parameter is shared by all its experts: record it once
                        seen.add(id(p))
                        self._flags.append((p, p.requires_grad))
                        p.requires_grad_(True)
        # The anchor leaf of each device the tracked modules live on, made here rather than in the
        # first hook: a compiled model's forward (torch.compile) cannot create a leaf that requires grad.
        for module in self._modules.values():
            for p in module.parameters(recurse=False):
                if p.device not in self._anchors:
                    self._anchors[p.device] = torch.zeros((), device=p.device, requires_grad=True)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._handles.clear()
        self._flags.clear()
        self._calls.clear()
        self._anchors.clear()

    def _tap(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through ``_Tap`` (in a differentiable forward of a floating-point input), else as it is."""
        if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        anchor = self._anchors.get(x.device)
        if anchor is None:
            anchor = self._anchors[x.device] = torch.zeros((), device=x.device, requires_grad=True)
        return _Tap.apply(x, anchor)

    def _tap_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args:
            return None
        return (self._tap(args[0]),) + tuple(args[1:])

    def _record(self, name: str, x: torch.Tensor | None, y: torch.Tensor | None, **routing: object) -> None:
        """Keep a call's input and its output's description; hook the output's gradient."""
        calls = self._calls.setdefault(name, [])
        waits = y is not None and y.requires_grad
        call = _Call(
            x, None if y is None else y.shape, None if y is None else y.device, y.grad_fn if waits else None, **routing
        )
        if waits:
            y.register_hook(self._grad_hook(name, len(calls)))
        calls.append(call)

    def _grad_hook(self, name: str, index: int):
        def hook(grad: torch.Tensor) -> None:
            run = self._run
            if run is not None:  # a backward that is not ours (none should run inside the context) is ignored
                run.arrive(name, index, grad)

        return hook

    def _hook(self, name: str):
        adapter = self.layers[name]

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not torch.is_grad_enabled():
                return  # nothing will be differentiated
            y = adapter.output(output, name)
            adapter.verify(module, inputs[0], y, name)
            self._record(name, inputs[0].detach(), y)

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
            recomputed, routed = forward_per_expert(module, self._tap(hidden), index, weights, owner, keep)
            check_recomputed(module, recomputed, output, owner)
            for (e, proj), name in tracked.items():
                r = routed[e]
                x, y = r.inputs.get(proj), r.outputs.get(proj)
                self._record(name, x, y, rows=r.rows, total=hidden.shape[0], dtype=hidden.dtype)
            return output.detach() + (recomputed - recomputed.detach())

        return hook

    def clear(self) -> None:
        """Forget the current forward pass (e.g. after an exception)."""
        self._calls.clear()

    def stream(
        self,
        loss: torch.Tensor,
        mask: torch.Tensor | TokenMasks | None = None,
        consume: Callable[[LayerCapture], None] | None = None,
        retain_graph: bool = False,
    ) -> None:
        """Backward from ``loss``, calling ``consume(c)`` with each tracked layer's ``LayerCapture``
        as soon as its output gradients are in (backward order; layers the loss does not reach come
        last, with zero gradients, in model order).

        ``mask`` is the task's ``token_mask(batch)``: [N, S] bool, or ``TokenMasks`` for a model
        with several token axes. ``retain_graph=True`` keeps the forward's records for another
        backward on the same graph (several pseudo-losses per forward pass). ``consume=None`` runs
        the backward and builds nothing (a pass whose results are discarded, but whose collectives
        must run). The capture is only valid during the call: keep what you need from it.
        """
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not depend on any tracked layer; check that the task's loss "
                "runs the model, and that it is not computed under torch.no_grad()"
            )
        missing = [n for n in self.layers if n not in self._calls]
        if missing and _compiled(self.model):
            # torch.compile does not guard on hooks by default: a graph compiled before the
            # Attributor existed runs on without them (nothing would be captured, so refuse)
            raise RuntimeError(
                f"tracked layers {missing[:5]} were not seen by headwater's hooks: this model was "
                "compiled (torch.compile) and run before headwater attached them, and the compiled "
                "graph does not call hooks added later; create the Attributor before the compiled "
                "model's first call, or call torch._dynamo.reset() first"
            )
        if missing:
            raise RuntimeError(
                f"tracked layers {missing[:5]} were not called in the forward pass; "
                "choose modules that the task's loss actually uses"
            )
        calls = self._calls
        if not retain_graph:
            self._calls = {}
        axes = _axes(mask)
        for name in self.layers:
            for call in calls[name]:
                _check_layout(call, axes, name)
        run = _Stream(calls, self.layers, mask, consume, retain_graph, _expected(calls, loss))
        anchors = list(self._anchors.values())
        self._run = run
        try:
            if anchors:
                torch.autograd.grad(loss, anchors, retain_graph=retain_graph, allow_unused=True)
            elif any(run.expected.values()):  # pragma: no cover - every recorded call of a float input is tapped
                raise RuntimeError("tracked layers were recorded without a tap; please report this")
            run.finish_rest(list(self.layers))
        finally:
            self._run = None
            run.grads.clear()

    def backward(
        self,
        loss: torch.Tensor,
        mask: torch.Tensor | TokenMasks | None = None,
        retain_graph: bool = False,
    ) -> Iterator[LayerCapture]:
        """Every tracked layer's ``LayerCapture``, in registration order, after one backward.

        This holds all layers' captures at once: for tests, exact baselines and small models.
        Passes over data use ``stream``, which holds one layer at a time.
        """
        out: dict[str, LayerCapture] = {}
        self.stream(loss, mask, lambda c: out.__setitem__(c.name, c), retain_graph)
        return iter([out[n] for n in self.layers if n in out])


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _expected(calls: dict[str, list[_Call]], loss: torch.Tensor) -> dict[str, int]:
    """How many calls of each layer the backward from ``loss`` will deliver a gradient to.

    Usually every call that has a gradient function. A layer called several times may have calls
    that this loss does not reach (a task that runs one forward per pseudo-loss): counting them
    would hold the layer's other gradients until the end of the backward, so then the calls'
    nodes are looked up among those reachable from the loss (a walk over the graph, only then).
    """
    waiting = {n: [c.grad_fn for c in cs if c.grad_fn is not None] for n, cs in calls.items()}
    if all(len(fns) <= 1 for fns in waiting.values()):
        return {n: len(fns) for n, fns in waiting.items()}
    seen: dict[int, object] = {}  # id -> node, kept alive so that no id is reused during the walk
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return {n: sum(id(fn) in seen for fn in fns) for n, fns in waiting.items()}


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
    x = call.x
    dtype = _dtype(x.dtype)
    gy = call.zeros(dtype) if gy is None else gy.to(dtype)
    x, gy = _to_sequences(x, axes, name), _to_sequences(gy, axes, name)
    a, g = adapter.flatten_input(x.to(dtype)), adapter.flatten_output(gy)
    if axes is None:
        return _Part(a, g, None, None)
    n, s = a.shape[:2]
    total = axes[-1].offset + axes[-1].length
    axis = _dense_axis(s, axes, name)
    if axis is not None:
        single = axis.offset == 0 and axis.length == total
        positions = None if single else (axis.offset + torch.arange(s, device=a.device)).expand(n, s)
        return _Part(a, g, axis.mask, positions)
    # applied once per sequence (pooled features): counts when the sequence is scored at all
    first = torch.zeros(n, 1, dtype=torch.long, device=a.device)
    return _Part(a, g, _scored_axis(mask).any(dim=1, keepdim=True), first)


def _dense_axis(s: int, axes: list[_Axis], name: str) -> _Axis | None:
    """The token axis of a call with ``s`` positions per sequence; None for a pooled call (s = 1)."""
    axis = next((ax for ax in axes if ax.length == s), None)
    if axis is not None or s == 1:
        return axis
    lengths = " or ".join(str(ax.length) for ax in axes)
    raise ValueError(
        f"layer {name!r} has {s} positions per sequence in one call, which does not line up with the batch's "
        f"{lengths} tokens, so its scored tokens are unknown; leave this layer out of modules"
    )


def _routed_axis(call: _Call, axes: list[_Axis] | None, name: str) -> _Axis:
    """The token axis an expert's routed rows index: the one whose N x length is the call's row count."""
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
    return axis


def _check_layout(call: _Call, axes: list[_Axis] | None, name: str) -> None:
    """Raise now, before any backward, what building the call's part would raise: the errors come in
    model order whatever order the gradients arrive in, and no backward is spent on a bad layer."""
    if call.rows is not None:
        _routed_axis(call, axes, name)
    elif axes is not None:
        x = _to_sequences(call.x, axes, name)
        _dense_axis(x.numel() // max(1, x.shape[0] * x.shape[-1]), axes, name)


def _routed_part(
    adapter: LayerAdapter, call: _Call, gy: torch.Tensor | None, axes: list[_Axis] | None, name: str
) -> _Part:
    """An expert's routed rows packed per sequence: [N, S_e, *], S_e = the most rows of one sequence."""
    axis = _routed_axis(call, axes, name)
    n = axes[0].mask.shape[0]
    device, i, o = axis.mask.device, adapter.in_features, adapter.out_features
    rows, dtype = call.rows, _dtype(call.dtype)
    if rows.numel() == 0:  # no token of the batch was routed to this expert: one empty, unscored position
        a = torch.zeros(n, 1, i, dtype=dtype, device=device)
        empty = torch.zeros(n, 1, dtype=torch.bool, device=device)
        return _Part(a, a.new_zeros(n, 1, o), empty, torch.full((n, 1), -1, dtype=torch.long, device=device))
    x = adapter.flatten_input(call.x.to(dtype))
    g = call.zeros(dtype) if gy is None else gy.to(dtype)
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
