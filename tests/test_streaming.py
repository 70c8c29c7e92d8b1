"""Streaming capture (``engine/capture.py``) and the pass loop's host reads (``engine/passes.py``).

The capture hands each layer to its consumer from inside the backward, one layer at a time, with
the numbers of a backward that asks autograd for every output gradient at once (the reference
below); and the per-batch hot path reads nothing back from the device but one transfer.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import headwater as hw
from _models import SharedMLP, lm_data, tiny_gpt2
from headwater.curvature import DiagonalCurvature
from headwater.curvature.accumulators import CovarianceAccumulator, LambdaAccumulator
from headwater.engine import Capture, LayerCapture, run_pass
from headwater.layers import select_layers
from headwater.scoring import QueryGradients, ScoreAccumulator, SelfInfluenceAccumulator


def _deep(layers: int = 5, d: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(d, d), nn.Tanh()]
    return nn.Sequential(*mods).double()


def _all_at_once(model: nn.Module, names: list[str], forward: Callable[[], list[torch.Tensor]]) -> list[dict]:
    """The reference: record every call's input and output, then ``autograd.grad`` w.r.t. all outputs at
    once per loss. Returns, per loss, {layer: (a [N,S,I], g [N,S,O])} with the calls concatenated along S."""
    layers = select_layers(model, names)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: records[n].append((i[0].detach(), o)))
        for n in names
    ]
    try:
        losses = forward()
    finally:
        for h in handles:
            h.remove()
    out = []
    ys = [y for n in names for _, y in records[n]]
    for k, loss in enumerate(losses):
        grads = iter(torch.autograd.grad(loss, ys, retain_graph=k < len(losses) - 1))
        per = {}
        for n in names:
            ad = layers[n]
            parts = [(ad.flatten_input(x), ad.flatten_output(next(grads))) for x, _ in records[n]]
            per[n] = (torch.cat([a for a, _ in parts], 1), torch.cat([g for _, g in parts], 1))
        out.append(per)
    return out


def test_streamed_captures_equal_all_at_once_gradients_bitwise():
    """A module called twice (its calls' gradients arrive separately) and two pseudo-losses on one forward."""
    model, x = SharedMLP(d=4, d_out=3).double(), torch.randn(5, 4, dtype=torch.float64)
    names = ["inp", "shared", "out"]
    weights = torch.randn(2, 3, dtype=torch.float64)

    def forward() -> list[torch.Tensor]:
        y = model(x)
        return [(y * w).sum() for w in weights]

    ref = _all_at_once(model, names, forward)
    with Capture(model, select_layers(model, names)) as cap:
        losses = forward()
        got = [[], []]
        for k, loss in enumerate(losses):
            cap.stream(loss, None, got[k].append, retain_graph=k == 0)
    for k in range(2):
        assert sorted(c.name for c in got[k]) == sorted(names)
        for c in got[k]:
            a, g = ref[k][c.name]
            assert torch.equal(c.a, a) and torch.equal(c.g, g), (k, c.name)
        assert next(c for c in got[k] if c.name == "shared").calls == 2


def test_layers_are_consumed_inside_the_backward_one_at_a_time():
    model, x = _deep(), torch.randn(3, 6, dtype=torch.float64)
    names = [str(i) for i in range(0, 10, 2)]
    events: list[str] = []
    alive: list[weakref.ref] = []

    def consume(c: LayerCapture) -> None:
        assert all(r() is None for r in alive), "an earlier layer's capture is still alive"
        alive.extend(weakref.ref(t) for t in (c, c.a, c.g))
        events.append(f"consume {c.name}")

    # the test's own tensor hooks on each output say when its gradient arrives
    def spy_on(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            output.register_hook(lambda g: events.append(f"grad {name}"))

        return hook

    spy = [model.get_submodule(n).register_forward_hook(spy_on(n)) for n in names]
    with Capture(model, select_layers(model, names)) as cap:
        loss = model(x).pow(2).sum()
        cap.stream(loss, None, consume)
    for h in spy:
        h.remove()
    backward = names[::-1]
    assert [e for e in events if e.startswith("consume")] == [f"consume {n}" for n in backward]
    for upper, lower in zip(backward, backward[1:]):  # consumed before the backward reaches the layer below
        assert events.index(f"consume {upper}") < events.index(f"grad {lower}")


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_no_weight_gradient_is_computed_and_no_grad_is_written():
    """L tracked layers: L input-gradient GEMMs (the lowest layer's included), against 2L - 1 for a
    training step's backward; ``.grad`` stays None and the requires_grad flags come back."""
    model, x = _deep(layers=4), torch.randn(3, 6, dtype=torch.float64)
    model[0].weight.requires_grad_(False)
    names = [str(i) for i in range(0, 8, 2)]
    with Capture(model, select_layers(model, names)) as cap:
        loss = model(x).pow(2).sum()
        with _CountMatmuls() as count:
            cap.stream(loss, None, lambda c: None)
    assert count.n == len(names)
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    loss = model(x).pow(2).sum()
    with _CountMatmuls() as plain:
        loss.backward()
    assert plain.n == 2 * len(names) - 1 - 1  # the frozen first weight gets no gradient either


def test_backward_collects_in_model_order_and_stream_without_consumer_builds_nothing():
    model, x = _deep(layers=3), torch.randn(2, 6, dtype=torch.float64)
    names = ["0", "2", "4"]
    with Capture(model, select_layers(model, names)) as cap:
        assert [c.name for c in cap.backward(model(x).sum())] == names
        built = []
        cap.stream(model(x).sum(), None, None)  # a filler batch: the backward runs, nothing is built
        cap.stream(model(x).sum(), None, built.append)  # and the next batch starts from a clean slate
    assert [c.calls for c in built] == [1, 1, 1]


def test_a_consumer_error_propagates_and_the_capture_is_reusable():
    model, x = _deep(layers=2), torch.randn(2, 6, dtype=torch.float64)

    def fail(c: LayerCapture) -> None:
        raise ValueError(f"consumer refused {c.name}")

    with Capture(model, select_layers(model, ["0", "2"])) as cap:
        with pytest.raises(ValueError, match="consumer refused 2"):
            cap.stream(model(x).sum(), None, fail)
        got = []
        cap.stream(model(x).sum(), None, got.append)
    assert sorted(c.name for c in got) == ["0", "2"] and all(c.a.shape[0] == 2 for c in got)


def test_a_layer_the_loss_does_not_reach_gets_zero_gradients():
    model, x = _deep(layers=2), torch.randn(2, 6, dtype=torch.float64)
    with Capture(model, select_layers(model, ["0", "2"])) as cap:
        h = model[1](model[0](x))
        model[2](h)  # called, but the loss ignores it
        got = {c.name: c for c in cap.backward(h.sum())}
    assert torch.count_nonzero(got["2"].g) == 0 and torch.count_nonzero(got["0"].g) > 0


def _captures(names: list[str], q: int = 3, n: int = 4, s: int = 5, seed: int = 0) -> list[LayerCapture]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, name in enumerate(names):
        o, k = 3 + i, 4 + i
        rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        out.append(LayerCapture(name, rand(n, s, k), rand(n, s, o), torch.rand(n, s, generator=g) > 0.3))
    return out


def test_scores_and_self_influence_do_not_depend_on_the_order_layers_arrive_in():
    names = [f"l{i}" for i in range(6)]
    caps = _captures(names)
    g = torch.Generator().manual_seed(1)
    shapes = {c.name: (c.g.shape[2], c.a.shape[2]) for c in caps}
    queries = {n: QueryGradients(full=torch.randn(3, *sh, generator=g).double()) for n, sh in shapes.items()}
    curvature = {n: DiagonalCurvature(torch.rand(*sh, generator=g).double() + 0.1) for n, sh in shapes.items()}

    def run(order: list[LayerCapture]) -> tuple[hw.Scores, torch.Tensor]:
        acc = ScoreAccumulator(queries, 4, per_layer=True, per_token=True)
        self_inf = SelfInfluenceAccumulator(curvature, dict.fromkeys(names, 0.1), 4)
        for c in order:
            acc.update(c, 0, True)
            self_inf.update(c, 0, True)
        acc.finish_batch(0)
        self_inf.finish_batch(0)
        return acc.result({}), self_inf.result()

    ref, ref_self = run(caps)
    assert torch.equal(ref.values, sum((ref.per_layer[n] for n in names[1:]), ref.per_layer[names[0]]))
    shuffled = caps[::-1]
    random.Random(0).shuffle(shuffled)
    for order in (caps[::-1], shuffled):
        got, got_self = run(order)
        assert torch.equal(got.values, ref.values) and torch.equal(got.per_token, ref.per_token)
        assert torch.equal(got_self, ref_self)


# ---------------------------------------------------------------------------- host reads per batch

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")


class _HostReads:
    """Counts, inside ``window()``, headwater's calls that read a device tensor back on the host (each
    one a device sync on a GPU): ``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``/``int()``,
    ``.nonzero()``, boolean-mask indexing. On CPU nothing syncs, so this is how a CPU test sees the
    GPU's syncs. Not counted: reads in the model's own forward (a training step makes them too),
    and reads of what a counted ``.cpu()`` already brought over (views of its storage)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count, self.sites, self._on, self._host = 0, [], 0, set()
        for name in _READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero, "torch.nonzero"))
        monkeypatch.setattr(torch, "masked_select", self._wrap(torch.masked_select, "torch.masked_select"))
        for name in ("__getitem__", "__setitem__"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name, _bool_index))

    def _wrap(self, fn: Callable, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> Callable:
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            counted = self._on and "/headwater/" in caller and not self._is_host(args) and when(*args, **kwargs)
            if counted:
                self.count += 1
                self.sites.append(f"{name} in {caller.rsplit('/headwater/', 1)[1]}:{sys._getframe(1).f_lineno}")
            self._on -= 1  # a read inside a read (e.g. nonzero inside boolean indexing) counts once
            try:
                out = fn(*args, **kwargs)
            finally:
                self._on += 1
            if counted and name == "cpu":
                self._host.add(out.untyped_storage().data_ptr())
            return out

        return wrapper

    def _is_host(self, args: tuple) -> bool:
        t = args[0] if args else None
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self._host

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        self._on += 1
        try:
            yield
        finally:
            self._on -= 1


def _bool_index(self: torch.Tensor, index: object, *rest: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _hot_path(monkeypatch: pytest.MonkeyPatch, reads: Callable[[], contextlib.AbstractContextManager]):
    """Wrap what run_pass does per batch after moving it to the device: the losses (forward), the
    streamed backward with its consumers, and ``finish_batch``."""
    stream = Capture.stream
    monkeypatch.setattr(Capture, "stream", lambda self, *a, **k: _within(reads, stream, self, *a, **k))

    def losses(fn: Callable) -> Callable:
        return lambda batch: _within(reads, fn, batch)

    return losses


def _within(reads: Callable[[], contextlib.AbstractContextManager], fn: Callable, *args, **kwargs):
    with reads():
        return fn(*args, **kwargs)


def _consumers(an: hw.Attributor, train: list) -> dict[str, tuple[object, Callable]]:
    """One consumer per training-data pass, with the losses that pass runs (empirical Fisher: its
    losses are the training loss, so only the engine and the consumer are under test)."""
    curvature = an.curvature
    queries = {n: QueryGradients(full=torch.randn(2, *curvature[n].shape, dtype=torch.float64)) for n in an.layers}
    shapes = {n: (ad.out_features, ad.in_features) for n, ad in an.layers.items()}
    return {
        "scores": (ScoreAccumulator(queries, len(train), True, True), an.training_loss),
        "self-influence": (SelfInfluenceAccumulator(curvature, an.damping(None), len(train)), an.training_loss),
        "eigenvalue correction": (LambdaAccumulator(curvature), an.training_loss),
        "covariance": (CovarianceAccumulator(shapes), an.training_loss),
    }


_KNOWN = {
    "covariance": "on the CPU, CovarianceAccumulator.update selects the scored tokens with a boolean mask (a "
    "read-back per layer, free on the host and bit-identical to earlier fits); on a GPU it weights by the mask "
    "instead, which the CUDA test below checks"
}


@pytest.mark.parametrize(
    "phase",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=_KNOWN[p])) if p in _KNOWN else p
        for p in ("scores", "self-influence", "eigenvalue correction", "covariance")
    ],
)
def test_the_hot_path_reads_back_at_most_once_per_batch(monkeypatch: pytest.MonkeyPatch, phase: str):
    model, train = tiny_gpt2(), lm_data(7)
    an = hw.Attributor(model, strategy="ekfac", fisher="empirical")
    an.fit(train, batch_size=3)
    consumer, losses = _consumers(an, train)[phase]
    reads = _HostReads(monkeypatch)
    wrap = _hot_path(monkeypatch, reads.window)
    finish = consumer.finish_batch
    monkeypatch.setattr(consumer, "finish_batch", lambda start: _within(reads.window, finish, start))
    run_pass(model, an.task, an.layers, train, consumer, losses=wrap(losses), batch_size=3, phase=phase)
    assert reads.count <= 3, f"{reads.count} host reads in 3 batches: {reads.sites}"


class _CudaSyncs:
    """Counts the syncs ``torch.cuda.set_sync_debug_mode("warn")`` reports inside ``window()``."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.messages += [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("phase", ["scores", "self-influence", "eigenvalue correction", "covariance"])
def test_the_cuda_hot_path_syncs_at_most_once_per_batch(monkeypatch: pytest.MonkeyPatch, phase: str):
    """``torch.cuda.set_sync_debug_mode`` inside the loop (forward, streamed backward, finish_batch)."""
    model, train = tiny_gpt2().cuda(), lm_data(7)
    an = hw.Attributor(model, strategy="ekfac", fisher="empirical")
    an.fit(train, batch_size=3)
    consumer, losses = _consumers(an, train)[phase]
    if phase == "scores":
        consumer.queries = {n: QueryGradients(full=q.full.cuda()) for n, q in consumer.queries.items()}
    syncs = _CudaSyncs()
    wrap = _hot_path(monkeypatch, syncs.window)
    finish = consumer.finish_batch
    monkeypatch.setattr(consumer, "finish_batch", lambda start: _within(syncs.window, finish, start))
    run_pass(model, an.task, an.layers, train, consumer, losses=wrap(losses), batch_size=3, phase=phase)
    assert len(syncs.messages) <= 3, f"{len(syncs.messages)} syncs in 3 batches: {syncs.messages}"
