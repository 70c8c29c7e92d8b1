"""Layer adapters: the only place that knows ``nn.Linear`` from Hugging Face ``Conv1D``.

Every tracked layer computes ``y = W a`` per token, with ``W`` of shape [O, I] in the
*canonical layout*: output features by input features, the bias (if any) folded in as the
last input column. Everything downstream (capture, curvature, scoring) works in that layout,
so supporting a new layer type means adding one adapter here (or, for fused MoE experts, in
``headwater.experts``) and nothing else.

Adapter kinds:

- ``"linear"``: ``nn.Linear`` (this includes PEFT's LoRA ``lora_A`` / ``lora_B`` matrices).
- ``"conv1d"``: HF ``Conv1D``, whose weight is stored transposed, [in, out].
- ``"router"``: the MoE router of ``transformers`` 5 (``MixtralTopKRouter`` and kin): a module
  whose only parameters are a 2-D ``weight`` (and a bias) and whose first output is
  ``F.linear(input, weight)``, the router logits. Each call is checked against that formula.
- ``"expert"``: one projection of one expert of a fused experts module (3-D parameters
  [experts, out, in]); see ``headwater.experts``.

Which of a model's modules get tracked (``modules=None | "mlp" | ...``) is ``headwater.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerAdapter", "adapter_for", "conv1d_to_linear", "equivalent", "conv1d_type"]


def conv1d_type() -> type | None:
    try:  # transformers is a dependency, but keep the engine importable without it.
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - only when transformers is broken or absent
        return None
    return Conv1D


def equivalent(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``x`` equals ``ref`` up to the rounding of ``ref``'s dtype, relative to its largest entry.

    Used where an adapter re-derives a module's output from its own description (router logits,
    per-expert recomputation): agreement to float64 rounding means the description is the
    module's math, and a structural mismatch (another activation, a missing scale) is off by
    O(1), far outside even the half-precision tolerance. One device sync.
    """
    if ref.numel() == 0:
        return True
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(ref.dtype, 3e-2)
    ref = ref.detach()
    err = (x.detach().to(ref.dtype) - ref).abs().max()
    return bool(err <= tol * (ref.abs().max() + tol))


@dataclass(frozen=True)
class LayerAdapter:
    """How one module type maps onto the canonical ``y = W a`` form.

    ``in_features`` counts the bias column, so ``I = in + 1`` when the layer has a bias.
    """

    kind: str  # "linear" | "conv1d" | "router" ("expert": headwater.experts.ExpertAdapter)
    in_features: int  # I, including the bias column
    out_features: int  # O
    has_bias: bool

    def owner(self, name: str) -> str:
        """The qualified name of the module that carries this layer's parameters (itself here)."""
        return name

    def output(self, result: Any, name: str) -> torch.Tensor:
        """The tensor ``y = W a`` among what the module returned: a router's first output, its logits."""
        y = result[0] if self.kind == "router" and isinstance(result, (tuple, list)) else result
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"layer {name!r} returned {type(result).__name__}, not a tensor; headwater's {self.kind} adapter "
                "cannot find its output, so leave this layer out of modules"
            )
        return y

    def verify(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> None:
        """Check that a call of a router really computed ``y = F.linear(x, weight, bias)``.

        ``nn.Linear`` and ``Conv1D`` are that by construction. A router is recognized by its name
        and parameters, so its forward might do more (scale, add noise); then the gradient
        ``g a^T`` would not be its weight's gradient, and that must be an error, not a silent
        mis-attribution.
        """
        if self.kind != "router":
            return
        with torch.no_grad():
            bias = module.bias.to(y.dtype) if self.has_bias else None
            ref = F.linear(x.reshape(-1, x.shape[-1]).to(y.dtype), module.weight.to(y.dtype), bias)
            same = ref.shape == y.reshape(-1, y.shape[-1]).shape and equivalent(y.reshape(ref.shape), ref)
        if not same:
            raise ValueError(
                f"router {name!r} ({type(module).__name__}) returned a first output that is not "
                "F.linear(input, weight), so headwater's router adapter does not describe it; leave it out of "
                "modules (pass a list of names)"
            )

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input [N, *, in] -> a [N, S, I], with a column of ones for the bias."""
        n = x.shape[0]
        a = x.reshape(n, -1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a

    def flatten_output(self, y: torch.Tensor) -> torch.Tensor:
        """Output (or output gradient) [N, *, out] -> [N, S, O]."""
        return y.reshape(y.shape[0], -1, y.shape[-1])

    def weight_grad(self, module: nn.Module) -> torch.Tensor:
        """The module's accumulated parameter gradient in canonical layout [O, I].

        Used by tests and exact baselines that compare against autograd; the engine itself
        never reads ``.grad``.
        """
        w = module.weight.grad
        if w is None:
            raise ValueError("the module has no .grad; run backward first")
        w = w.t() if self.kind == "conv1d" else w
        if self.has_bias:
            w = torch.cat([w, module.bias.grad.unsqueeze(1)], dim=1)
        return w

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters in canonical layout [O, I] (a copy)."""
        w = module.weight.detach()
        w = w.t() if self.kind == "conv1d" else w
        if self.has_bias:
            w = torch.cat([w, module.bias.detach().unsqueeze(1)], dim=1)
        return w.clone()

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters that the canonical matrix covers, weight first."""
        return [module.weight] + ([module.bias] if self.has_bias else [])

    def covers(self, module: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """(parameter, how many of its entries this layer covers): all of them for a whole module."""
        return [(p, p.numel()) for p in self.parameters(module)]

    def split(self, canonical: torch.Tensor) -> list[torch.Tensor]:
        """Canonical [O, I] -> tensors shaped like ``parameters(module)``."""
        w = canonical[:, : self.in_features - int(self.has_bias)]
        w = w.t() if self.kind == "conv1d" else w
        out = [w.contiguous()]
        if self.has_bias:
            out.append(canonical[:, -1].contiguous())
        return out


def _router_adapter(module: nn.Module) -> LayerAdapter | None:
    """A ``*Router`` module whose only own parameters are a 2-D weight [E, d] and perhaps a bias [E]."""
    if not type(module).__name__.lower().endswith("router"):
        return None
    own = dict(module.named_parameters(recurse=False))
    w, b = own.get("weight"), own.get("bias")
    if w is None or w.dim() != 2 or set(own) - {"weight", "bias"} or (b is not None and b.shape != w.shape[:1]):
        return None
    if any(True for child in module.children() for _ in child.parameters()):
        return None  # a router built from sub-layers (e.g. an nn.Linear classifier): those are tracked instead
    return LayerAdapter("router", w.shape[1] + (b is not None), w.shape[0], b is not None)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a supported module, or None if the type is not supported.

    Fused experts are several layers per module: ``supported_layers`` asks ``headwater.experts``.
    """
    if isinstance(module, nn.Linear):
        has_bias = module.bias is not None
        return LayerAdapter("linear", module.in_features + has_bias, module.out_features, has_bias)
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        nx, nf = module.weight.shape
        has_bias = module.bias is not None
        return LayerAdapter("conv1d", nx + has_bias, nf, has_bias)
    return _router_adapter(module)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every HF ``Conv1D`` in ``model`` by the equivalent ``nn.Linear``, in place.

    headwater tracks Conv1D natively; this exists to compare with tools that track only
    ``nn.Linear`` (kronfluence), and to test that both forms give the same scores.
    """
    conv1d = conv1d_type()
    for name, mod in list(model.named_modules()):
        if conv1d is not None and isinstance(mod, conv1d):
            nx, nf = mod.weight.shape
            lin = nn.Linear(nx, nf).to(mod.weight.device, mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model
