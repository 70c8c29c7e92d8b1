"""Layer adapters: the only place that knows ``nn.Linear`` from Hugging Face ``Conv1D``.

Every tracked layer computes ``y = W a`` per token, with ``W`` of shape [O, I] in the
*canonical layout*: output features by input features, the bias (if any) folded in as the
last input column. Everything downstream (capture, curvature, scoring) works in that layout,
so supporting a new layer type means adding one adapter here and nothing else.

Module selection (``modules=None | "mlp" | [names]``) also lives here, because which modules
are supported is a property of their type.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerAdapter", "adapter_for", "select_layers", "conv1d_to_linear", "MLP_PARENTS"]

# Parent-module names under which common HF architectures keep their MLP projections:
# GPT-2 (mlp.c_fc / mlp.c_proj), Llama/Mistral/Qwen (mlp.gate_proj/up_proj/down_proj),
# GPT-NeoX (mlp.dense_h_to_4h / dense_4h_to_h), Falcon/OPT-like "feed_forward" / "ffn".
MLP_PARENTS = ("mlp", "feed_forward", "ffn")


def _conv1d_type() -> type | None:
    try:  # transformers is a dependency, but keep the engine importable without it.
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - only when transformers is broken or absent
        return None
    return Conv1D


@dataclass(frozen=True)
class LayerAdapter:
    """How one module type maps onto the canonical ``y = W a`` form.

    ``in_features`` counts the bias column, so ``I = in + 1`` when the layer has a bias.
    """

    kind: str  # "linear" | "conv1d"
    in_features: int  # I, including the bias column
    out_features: int  # O
    has_bias: bool

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

    def split(self, canonical: torch.Tensor) -> list[torch.Tensor]:
        """Canonical [O, I] -> tensors shaped like ``parameters(module)``."""
        w = canonical[:, : self.in_features - int(self.has_bias)]
        w = w.t() if self.kind == "conv1d" else w
        out = [w.contiguous()]
        if self.has_bias:
            out.append(canonical[:, -1].contiguous())
        return out


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a supported module, or None if the type is not supported."""
    if isinstance(module, nn.Linear):
        has_bias = module.bias is not None
        return LayerAdapter("linear", module.in_features + has_bias, module.out_features, has_bias)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        nx, nf = module.weight.shape
        has_bias = module.bias is not None
        return LayerAdapter("conv1d", nx + has_bias, nf, has_bias)
    return None


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every HF ``Conv1D`` in ``model`` by the equivalent ``nn.Linear``, in place.

    headwater tracks Conv1D natively; this exists to compare with tools that track only
    ``nn.Linear`` (kronfluence), and to test that both forms give the same scores.
    """
    conv1d = _conv1d_type()
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


def _is_mlp(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in MLP_PARENTS


def select_layers(model: nn.Module, modules: None | str | Sequence[str]) -> dict[str, LayerAdapter]:
    """Resolve the user's ``modules`` argument into ``{qualified name: adapter}``.

    ``None`` tracks every supported layer, ``"mlp"`` the MLP projections of common
    architectures, and a list names modules explicitly. Unknown names and unsupported
    module types are errors that list what is available.
    """
    supported = {n: ad for n, m in model.named_modules() if (ad := adapter_for(m)) is not None}
    if not supported:
        raise ValueError(
            f"model {type(model).__name__} has no supported layers (nn.Linear or HF Conv1D); "
            "headwater can only attribute through those"
        )
    if modules is None:
        warn_tied(model, supported)
        return supported
    if isinstance(modules, str):
        if modules != "mlp":
            raise ValueError(
                f"modules={modules!r} is not understood; pass None (every supported layer), "
                f"'mlp', or a list of module names such as {list(supported)[:4]}"
            )
        chosen = {n: ad for n, ad in supported.items() if _is_mlp(n)}
        if not chosen:
            raise ValueError(
                f"modules='mlp' found no MLP projections (a supported layer inside a module "
                f"named one of {MLP_PARENTS}) in {type(model).__name__}; pass a list of "
                f"names instead. Supported layers: {_preview(supported)}"
            )
        return chosen
    if not isinstance(modules, Sequence) or not all(isinstance(m, str) for m in modules):
        raise TypeError(f"modules must be None, 'mlp' or a list of module names, got {type(modules).__name__}")
    if len(modules) == 0:
        raise ValueError("modules is an empty list; name at least one layer, or pass None")
    all_modules = dict(model.named_modules())
    chosen = {}
    for name in modules:
        if name not in all_modules:
            raise ValueError(
                f"module {name!r} does not exist in {type(model).__name__}. Supported layers: {_preview(supported)}"
            )
        if name not in supported:
            raise ValueError(
                f"module {name!r} is a {type(all_modules[name]).__name__}, which headwater "
                f"cannot track (only nn.Linear and HF Conv1D). Supported layers: "
                f"{_preview(supported)}"
            )
        chosen[name] = supported[name]
    warn_tied(model, chosen)
    return chosen


def warn_tied(model: nn.Module, chosen: dict[str, LayerAdapter]) -> None:
    """Warn when a tracked layer's weight is also used by a module headwater cannot track.

    GPT-2's ``lm_head`` shares its weight with the token embedding: its gradient has an
    embedding part that no layer hook sees, so headwater attributes only its linear use.
    """
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    for name in chosen:
        others = [o for o in owners.get(id(model.get_submodule(name).weight), []) if o != name and o not in chosen]
        if others:
            warnings.warn(
                f"layer {name!r} shares its weight with {others}, which headwater does not track; only "
                "its use as a linear layer is attributed",
                stacklevel=3,
            )


def _preview(names: dict, limit: int = 24) -> str:
    keys = list(names)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
