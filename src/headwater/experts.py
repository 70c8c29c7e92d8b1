"""Fused MoE experts as layers: each expert's projections are tracked layers with their own factors.

In ``transformers`` 5 the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3 and some sixty
other families are one module (``@use_experts_implementation``) holding 3-D parameters::

    gate_up_proj [E, 2F, d]   (or up_proj [E, F, d] without a gate; [E, in, out] when is_transposed)
    down_proj    [E, d, F]
    forward(hidden_states [T, d], top_k_index [T, K], top_k_weights [T, K]) -> [T, d]

computed by a grouped or batched matmul, so no per-expert ``y = W a`` ever exists as a module
call that a hook could see. For expert e and a token t routed to it (slot k of its top-k)::

    x = hidden[t]                                   # [d]
    u = W_up[e] x (+ b_up[e])                       # gate_up_proj's output, [2F]
    h = _apply_gate(u)   (act_fn(u) without a gate) # [F]
    y = W_down[e] h (+ b_down[e])                   # down_proj's output, [d]
    out[t] += top_k_weights[t, k] * post_expert_norm(y)

``forward_per_expert`` recomputes exactly that, expert by expert (the eager reference of the
fused implementations), so that autograd runs through per-expert matmuls whose inputs and
outputs the capture records. The per-sequence gradient of expert e's down projection is then
``sum over the sequence's tokens routed to e of g a^T`` with ``g = dL/dy``, which already carries
the routing weight: the experts are fitted over the tokens routed to them, weighted as in the
forward pass. Tokens routed nowhere (an expert-parallel sentinel index >= E) contribute nothing,
as in the fused forward.

The capture (``engine/capture.py``, the only hook site) runs this inside a forward hook and
returns ``original + (recomputed - recomputed.detach())``: the model's outputs are the fused
module's own values, bit for bit, while gradients flow through the recomputation. It first
checks that the recomputation equals the fused output to the dtype's rounding, so a family whose
experts compute something else is an error naming the module, never a silent mis-attribution.

Cost: the experts' forward runs twice in captured passes (the fused kernel for the values, the
per-expert loop for the gradients); the backward runs once. Memory is what the graph holds
anyway: the recorded inputs are views of the tensors autograd saves, proportional to the routed
tokens (T x K rows), not to experts x tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import LayerAdapter, equivalent

__all__ = [
    "ExpertAdapter",
    "Routed",
    "expert_layers",
    "is_fused_experts",
    "forward_per_expert",
    "routing_args",
    "check_recomputed",
]

_DESCRIBED = ("num_experts", "has_gate", "has_bias", "is_transposed")  # set by @use_experts_implementation


@dataclass(frozen=True)
class ExpertAdapter(LayerAdapter):
    """One projection of one expert: the slice ``getattr(module, proj)[expert]`` of a fused parameter.

    Canonical layout as every layer: [O, I] with the bias (``<proj>_bias[expert]``) as the last
    input column. ``transposed``: the fused parameter is stored [E, in, out].
    """

    expert: int = 0
    proj: str = "down_proj"  # "gate_up_proj" | "up_proj" | "down_proj"
    transposed: bool = False

    def owner(self, name: str) -> str:
        """``model.layers.0.mlp.experts.3.down_proj`` -> ``model.layers.0.mlp.experts``."""
        return name.rsplit(".", 2)[0]

    def output(self, result: object, name: str) -> torch.Tensor:  # pragma: no cover - capture records experts itself
        raise TypeError(f"layer {name!r} is an expert of a fused module; its outputs are recorded by the capture")

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """Routed rows [T_e, in] -> [T_e, I], with a column of ones for the bias."""
        return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1) if self.has_bias else x

    def flatten_output(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        w = t[self.expert]
        return w.t() if self.transposed else w

    def _bias(self, module: nn.Module) -> nn.Parameter:
        return getattr(module, f"{self.proj}_bias")

    def weight_grad(self, module: nn.Module) -> torch.Tensor:
        """This expert's slice of the fused parameter's ``.grad``, canonical [O, I] (tests and baselines)."""
        g = getattr(module, self.proj).grad
        if g is None:
            raise ValueError("the module has no .grad; run backward first")
        w = self._slice(g)
        if self.has_bias:
            w = torch.cat([w, self._bias(module).grad[self.expert].unsqueeze(1)], dim=1)
        return w

    def weight(self, module: nn.Module) -> torch.Tensor:
        w = self._slice(getattr(module, self.proj).detach())
        if self.has_bias:
            w = torch.cat([w, self._bias(module).detach()[self.expert].unsqueeze(1)], dim=1)
        return w.clone()

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The whole fused parameters this slice lives in (the capture makes them require grad)."""
        return [getattr(module, self.proj)] + ([self._bias(module)] if self.has_bias else [])

    def covers(self, module: nn.Module) -> list[tuple[nn.Parameter, int]]:
        return [(p, p[self.expert].numel()) for p in self.parameters(module)]

    def split(self, canonical: torch.Tensor) -> list[torch.Tensor]:
        """Canonical [O, I] -> tensors shaped like this expert's slices ``param[expert]``."""
        w = canonical[:, : self.in_features - int(self.has_bias)]
        out = [(w.t() if self.transposed else w).contiguous()]
        if self.has_bias:
            out.append(canonical[:, -1].contiguous())
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A ``transformers`` fused experts module: 3-D ``down_proj`` and the attributes that describe its math."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3 and all(hasattr(module, a) for a in _DESCRIBED)


def expert_layers(module: nn.Module) -> dict[str, ExpertAdapter] | None:
    """``{"<expert>.<proj>": adapter}`` for a fused experts module, experts in order; None for any other module."""
    if not is_fused_experts(module):
        return None
    up = "gate_up_proj" if module.has_gate else "up_proj"
    out = {}
    for e in range(int(module.num_experts)):
        for proj in (up, "down_proj"):
            w = getattr(module, proj)
            o, i = (w.shape[2], w.shape[1]) if module.is_transposed else (w.shape[1], w.shape[2])
            has_bias = bool(module.has_bias)
            out[f"{e}.{proj}"] = ExpertAdapter(
                "expert", i + has_bias, o, has_bias, expert=e, proj=proj, transposed=bool(module.is_transposed)
            )
    return out


@dataclass
class Routed:
    """What one expert saw in one call of its fused module.

    rows: [T_e] indices of the routed tokens among the call's T rows, ascending; inputs / outputs:
    ``{proj: [T_e, in]}`` (detached) and ``{proj: [T_e, out]}`` (in the autograd graph).
    """

    rows: torch.Tensor
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def routing_args(module: nn.Module, args: tuple, kwargs: dict, name: str) -> tuple[torch.Tensor, ...]:
    """``(hidden_states, top_k_index, top_k_weights)`` of a fused experts call, positional or by keyword.

    The keywords are the forward's own first three parameter names (GPT-OSS calls them
    ``router_indices`` and ``routing_weights``).
    """
    try:
        keys = list(inspect.signature(module.forward).parameters)[:3]
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        keys = ["hidden_states", "top_k_index", "top_k_weights"]
    values = list(args[:3]) + [kwargs.get(k) for k in keys[len(args[:3]) :]]
    if len(values) < 3 or any(not isinstance(v, torch.Tensor) for v in values):
        raise TypeError(
            f"fused experts module {name!r} was called without (hidden_states, top_k_index, top_k_weights); "
            "headwater cannot see its routing, so leave its experts out of modules"
        )
    return values[0], values[1], values[2]


def forward_per_expert(
    module: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    name: str,
    keep: set[int] | None = None,
) -> tuple[torch.Tensor, dict[int, Routed]]:
    """The fused module's output [T, d], recomputed expert by expert, and what each expert in ``keep`` saw.

    Tokens are grouped by expert with one stable sort (one device sync for the group sizes), so
    each expert's rows come out ascending. Experts without tokens get empty ``Routed`` records.
    """
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(
            f"fused experts module {name!r} is expert-parallel (its experts live on several ranks); headwater "
            "attributes experts on an unsharded module only, so leave its experts out of modules"
        )
    if hidden.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"fused experts module {name!r} got hidden states {tuple(hidden.shape)} and routing "
            f"{tuple(top_k_index.shape)} / {tuple(top_k_weights.shape)}, not [T, d] and [T, K]; headwater cannot "
            "recompute it, so leave its experts out of modules"
        )
    n_experts, k = int(module.num_experts), top_k_index.shape[1]
    up = "gate_up_proj" if module.has_gate else "up_proj"
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert; within one, tokens ascending
    sizes = torch.bincount(flat.clamp(0, n_experts), minlength=n_experts + 1).tolist()  # the sync
    out = torch.zeros_like(hidden)
    routed: dict[int, Routed] = {}
    lo = 0
    for e in range(n_experts):
        slots = order[lo : lo + sizes[e]]
        lo += sizes[e]
        rows = slots // k
        if keep is None or e in keep:
            routed[e] = Routed(rows, {}, {})
        if rows.numel() == 0:
            continue
        x = hidden[rows]
        u = _linear(x, module, up, e)
        h = module._apply_gate(u) if module.has_gate else module.act_fn(u)
        y = _linear(h, module, "down_proj", e)
        z = module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y
        w = top_k_weights.reshape(-1)[slots]
        out.index_add_(0, rows, (z * w[:, None]).to(out.dtype))
        if e in routed:
            routed[e].inputs.update({up: x.detach(), "down_proj": h.detach()})
            routed[e].outputs.update({up: u, "down_proj": y})
    return out, routed


def _linear(x: torch.Tensor, module: nn.Module, proj: str, e: int) -> torch.Tensor:
    w = getattr(module, proj)[e]
    bias = getattr(module, f"{proj}_bias")[e] if module.has_bias else None
    return F.linear(x, w.t() if module.is_transposed else w, bias)


def check_recomputed(module: nn.Module, recomputed: torch.Tensor, original: object, name: str) -> None:
    """The per-expert recomputation must equal the fused forward (to the dtype's rounding), or attribution stops."""
    kind = type(module).__name__
    if not isinstance(original, torch.Tensor) or original.shape != recomputed.shape:
        raise ValueError(
            f"fused experts module {name!r} ({kind}) returned {type(original).__name__} "
            f"{tuple(getattr(original, 'shape', ()))}, not the [T, d] tensor headwater recomputes; leave its experts "
            "out of modules"
        )
    if not equivalent(recomputed, original):
        err = (recomputed.detach() - original.detach()).abs().max().item()
        raise ValueError(
            f"the per-expert recomputation of fused experts module {name!r} ({kind}) differs from its own forward "
            f"by up to {err:.3g}, so its experts compute something headwater's expert adapter does not describe; "
            "leave them out of modules (pass a list of names) and report the model family"
        )
