"""Which layers to track: module selection (``modules=None | "mlp" | "base" | "adapters" | [names]``)
and the account of what a selection covers (``coverage``, ``describe_layers``).

Nothing that carries weights is left out of attribution without an ``UntrackedWarning`` naming
it. The per-type math lives in the adapters (``headwater.adapters``; fused MoE experts in
``headwater.experts``); their names are re-exported here.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from .adapters import LayerAdapter, adapter_for, conv1d_to_linear, equivalent
from .errors import HeadwaterWarning
from .experts import expert_layers, is_fused_experts

__all__ = [
    "LayerAdapter",
    "UntrackedWarning",
    "adapter_for",
    "supported_layers",
    "select_layers",
    "layer_kind",
    "coverage",
    "describe_layers",
    "conv1d_to_linear",
    "equivalent",
    "is_peft",
    "MLP_PARENTS",
    "LAYER_KINDS",
    "MODULE_CHOICES",
]

# Parent-module names under which common HF architectures keep their MLP projections:
# GPT-2 (mlp.c_fc / mlp.c_proj), Llama/Mistral/Qwen (mlp.gate_proj/up_proj/down_proj),
# GPT-NeoX (mlp.dense_h_to_4h / dense_4h_to_h), MPT/DistilBERT "ffn", Falcon-like "feed_forward",
# BERT/RoBERTa "intermediate" (the FFN's up projection), T5 "DenseReluDense", and the MoE blocks
# (experts and shared experts sit under "mlp" in Mixtral/Qwen-MoE/OLMoE/DeepSeek).
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "intermediate", "DenseReluDense", "block_sparse_moe")

# What ``layer_kind`` answers, in display order.
LAYER_KINDS = ("attention", "mlp", "expert", "shared-expert", "router", "adapter", "other")

# The string forms of ``modules``.
MODULE_CHOICES = ("mlp", "base", "adapters")


class UntrackedWarning(HeadwaterWarning):
    """``modules=None`` left weight-bearing parameters out of attribution (no adapter for their module)."""


def supported_layers(model: nn.Module) -> dict[str, LayerAdapter]:
    """Every layer headwater can track in ``model``, ``{qualified name: adapter}``, in module order.

    A fused experts module contributes one layer per expert and projection, named
    ``<module>.<expert>.<projection>`` (``model.layers.0.mlp.experts.3.down_proj``).
    """
    routed = _routed_row_experts(model)
    out: dict[str, LayerAdapter] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{r}.") for r in routed):
            continue
        if (ad := adapter_for(module)) is not None:
            out[name] = ad
        elif (fused := expert_layers(module)) is not None:
            out.update({f"{name}.{key}": ad for key, ad in fused.items()})
    return out


def _routed_row_experts(model: nn.Module) -> list[str]:
    """Expert containers whose experts are separate modules run on the gathered rows routed to them
    (SwitchTransformers, NLLB-MoE: ``experts.expert_3.wi``).

    Their layers' inputs are [T_e, d] rows with no record of which sequence each came from, and
    when T_e happens to equal the batch size they would pass for one pooled position per
    sequence: a silent mis-attribution. So they are not supported; ``coverage`` names them and
    ``modules=None`` warns.
    """
    return [
        name
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Experts") and not is_fused_experts(m) and any(True for _ in m.children())
    ]


# ------------------------------------------------------------------------------------- PEFT


def _tuner_layer_type() -> type | None:
    """PEFT's base class of adapter-wrapped layers, if peft is loaded (a peft model implies it is)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - a peft too old or broken to have it
        return None
    return BaseTunerLayer


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT adapter layers (a ``PeftModel``, or the tuner model inside one)."""
    tuner = _tuner_layer_type()
    return tuner is not None and any(isinstance(m, tuner) for m in model.modules())


def _unwrap(name: str) -> str:
    """The name of the layer an adapter matrix (or ``base_layer``) belongs to: PEFT nests them as
    ``<layer>.lora_A.<adapter>``, ``<layer>.lora_B.<adapter>`` and ``<layer>.base_layer``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B", "base_layer", "modules_to_save", "original_module"):
            return ".".join(parts[:i])
    return name


def _is_adapter(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


def _trainable(model: nn.Module, layers: dict[str, LayerAdapter]) -> dict[str, LayerAdapter]:
    return {n: ad for n, ad in layers.items() if ad.parameters(model.get_submodule(ad.owner(n)))[0].requires_grad}


def _base(layers: dict[str, LayerAdapter]) -> dict[str, LayerAdapter]:
    """The layers of the model under the adapters: every layer but the adapter matrices and the frozen
    originals of ``modules_to_save`` (which the forward pass does not call)."""
    return {n: ad for n, ad in layers.items() if not _is_adapter(n) and "original_module" not in n.split(".")}


# ------------------------------------------------------------------------------------ kinds


def _is_mlp(name: str) -> bool:
    parts = _unwrap(name).split(".")
    if any(p in MLP_PARENTS or p.startswith("shared_expert") for p in parts[:-1]):
        return True
    if len(parts) >= 2 and parts[-2].isdigit() and parts[-1] in ("fc1", "fc2"):
        return True  # OPT, BART: fc1/fc2 sit directly in the decoder layer
    # BERT/RoBERTa: layer.N.output.dense is the FFN's down projection (attention.output.dense is not)
    return len(parts) >= 3 and parts[-2] == "output" and parts[-3].isdigit()


def layer_kind(name: str, adapter: LayerAdapter) -> str:
    """What a tracked layer is, from its adapter and its name: one of ``LAYER_KINDS``.

    attention (projections of any self-, cross- or encoder-decoder attention), mlp (dense FFN
    projections), expert (one projection of one routed expert), shared-expert (the always-on
    experts of Qwen2-MoE and DeepSeek), router (MoE routing gates, including Qwen2-MoE's
    ``shared_expert_gate``), adapter (LoRA matrices), other (heads, poolers, classifiers).
    """
    if adapter.kind in ("expert", "router"):
        return adapter.kind
    if _is_adapter(name):
        return "adapter"
    parts = [p.lower() for p in _unwrap(name).split(".")]
    if any(p.startswith("shared_expert") for p in parts):
        return "router" if parts[-1].startswith("shared_expert") and parts[-1].endswith("gate") else "shared-expert"
    if any("attn" in p or "attention" in p for p in parts[:-1]):
        return "attention"
    if _is_mlp(name):
        return "mlp"
    return "other"


def _is_mlp_layer(name: str, adapter: LayerAdapter) -> bool:
    """Selected by ``modules="mlp"``: dense MLP projections, experts, shared experts, and adapters on them."""
    kind = layer_kind(name, adapter)
    return kind in ("mlp", "expert", "shared-expert") or (kind == "adapter" and _is_mlp(name))


# -------------------------------------------------------------------------------- selection


def select_layers(model: nn.Module, modules: None | str | Sequence[str]) -> dict[str, LayerAdapter]:
    """Resolve the user's ``modules`` argument into ``{qualified name: adapter}``.

    - ``None``: every supported layer; on a PEFT model, the trainable ones (the LoRA matrices and
      any ``modules_to_save``), which is what fine-tuning changed. Weight-bearing parameters that
      no layer covers (other than embedding tables) get a ``UntrackedWarning`` naming them.
    - ``"mlp"``: the MLP projections (dense FFNs, MoE experts and shared experts; on a PEFT model,
      the adapters on those).
    - ``"base"`` (PEFT only): the layers of the model under the adapters, LoRA matrices excluded.
    - ``"adapters"`` (PEFT only): the LoRA matrices and other trainable layers, as ``None`` does.
    - a list of names: those layers; the name of a fused experts module stands for all its experts.

    Unknown names and unsupported module types are errors that list what is available.
    """
    supported = supported_layers(model)
    if not supported:
        raise ValueError(
            f"model {type(model).__name__} has no supported layers (nn.Linear, HF Conv1D, MoE routers or fused "
            "experts); headwater can only attribute through those"
        )
    peft = is_peft(model)
    pool = _trainable(model, supported) if peft else supported
    if modules is None:
        if not pool:
            raise ValueError(
                f"the PEFT model {type(model).__name__} has no trainable layer that headwater supports; pass "
                "modules='base' to attribute through the base model's layers"
            )
        warn_untracked(model, pool)
        warn_tied(model, pool)
        return pool
    if isinstance(modules, str):
        chosen = _by_keyword(model, modules, supported, pool, peft)
        warn_tied(model, chosen)
        return chosen
    if not isinstance(modules, Sequence) or not all(isinstance(m, str) for m in modules):
        raise TypeError(
            f"modules must be None, one of {MODULE_CHOICES} or a list of module names, got {type(modules).__name__}"
        )
    if len(modules) == 0:
        raise ValueError("modules is an empty list; name at least one layer, or pass None")
    all_modules = dict(model.named_modules())
    chosen: dict[str, LayerAdapter] = {}
    for name in modules:
        if name in supported:
            chosen[name] = supported[name]
            continue
        experts = {n: ad for n, ad in supported.items() if ad.kind == "expert" and ad.owner(n) == name}
        if experts:
            chosen.update(experts)
            continue
        if name not in all_modules:
            raise ValueError(
                f"module {name!r} does not exist in {type(model).__name__}. Supported layers: {_preview(supported)}"
            )
        raise ValueError(
            f"module {name!r} is a {type(all_modules[name]).__name__}, which headwater cannot track (only "
            f"nn.Linear, HF Conv1D, MoE routers and fused experts). Supported layers: {_preview(supported)}"
        )
    warn_tied(model, chosen)
    return chosen


def _by_keyword(
    model: nn.Module, keyword: str, supported: dict[str, LayerAdapter], pool: dict[str, LayerAdapter], peft: bool
) -> dict[str, LayerAdapter]:
    kind = type(model).__name__
    if keyword == "mlp":
        chosen = {n: ad for n, ad in pool.items() if _is_mlp_layer(n, ad)}
        if not chosen:
            where = "adapters on MLP projections" if peft else "MLP projections"
            hint = " (the adapters target no MLP layer; pass modules='base' for the base model's)" if peft else ""
            raise ValueError(
                f"modules='mlp' found no {where} in {kind}{hint}; pass a list of names instead. "
                f"Supported layers: {_preview(pool)}"
            )
        return chosen
    if keyword in ("base", "adapters"):
        if not peft:
            raise ValueError(
                f"modules={keyword!r} selects among the layers of a PEFT model, but {kind} has no adapter layers; "
                "pass None (every supported layer), 'mlp', or a list of names"
            )
        return _base(supported) if keyword == "base" else pool
    raise ValueError(
        f"modules={keyword!r} is not understood; pass None (every supported layer), one of {MODULE_CHOICES}, "
        f"or a list of module names such as {list(supported)[:4]}"
    )


def warn_tied(model: nn.Module, chosen: dict[str, LayerAdapter]) -> None:
    """Warn when a tracked layer's weight is also used by a module headwater cannot track.

    GPT-2's ``lm_head`` shares its weight with the token embedding: its gradient has an
    embedding part that no layer hook sees, so headwater attributes only its linear use.
    """
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    tracked = {ad.owner(n) for n, ad in chosen.items()}
    for name, ad in chosen.items():
        if ad.kind == "expert":
            continue  # a fused parameter is shared by its own experts only
        weight = ad.parameters(model.get_submodule(ad.owner(name)))[0]
        others = [o for o in owners.get(id(weight), []) if o not in tracked]
        if others:
            warnings.warn(
                f"layer {name!r} shares its weight with {others}, which headwater does not track; only "
                "its use as a linear layer is attributed",
                stacklevel=3,
            )


# --------------------------------------------------------------------------------- coverage


def coverage(model: nn.Module, layers: dict[str, LayerAdapter]) -> dict[str, Any]:
    """What a layer selection covers of ``model``'s parameters (each shared parameter counted once).

    Returns ``params`` (all entries), ``covered`` (entries some tracked layer attributes),
    ``share`` = covered / params, ``attributable`` (entries of the parameters attribution should
    cover: every parameter except embedding tables and 1-D vectors such as norm scales and the
    biases of untracked modules; on a PEFT model only the trainable ones), ``attributable_share``,
    ``by_kind`` ({layer kind: covered entries}) and ``untracked``: one dict per parameter not fully
    covered, with ``name``, ``shape``, ``numel``, ``covered`` and ``reason``; those with
    ``warn=True`` are the weight-bearing ones that ``modules=None`` warns about.
    """
    peft, routed = is_peft(model), _routed_row_experts(model)
    owner_of: dict[int, nn.Module] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner_of.setdefault(id(p), mod)
    done: dict[int, int] = {}
    by_kind = dict.fromkeys(LAYER_KINDS, 0)
    for name, ad in layers.items():
        for p, k in ad.covers(model.get_submodule(ad.owner(name))):
            done[id(p)] = done.get(id(p), 0) + k
            by_kind[layer_kind(name, ad)] += k
    total = covered = attributable = 0
    untracked = []
    for pname, p in model.named_parameters():
        n, c = p.numel(), min(done.get(id(p), 0), p.numel())
        total, covered = total + n, covered + c
        embedding = isinstance(owner_of.get(id(p)), nn.Embedding)
        if peft:  # what fine-tuning changed: every trainable parameter, vectors included
            wanted = p.requires_grad and not embedding
        else:
            wanted = p.dim() >= 2 and not embedding
        attributable += n if wanted or c else 0
        if c == n:
            continue
        if peft and not p.requires_grad:
            reason = "frozen (PEFT base weight)"
        elif embedding:
            reason = "embedding table"
        elif c:
            reason = f"partly tracked ({c} of {n} entries: some experts are not selected)"
        elif not wanted:
            reason = "vector (a norm scale or the bias of an untracked module)"
        elif any(pname.startswith(f"{r}.") for r in routed):
            reason = "no adapter for experts run on routed token rows (only fused experts are supported)"
        else:
            reason = f"no adapter for {type(owner_of.get(id(p))).__name__}"
        warn = wanted and not c
        untracked.append(
            {"name": pname, "shape": list(p.shape), "numel": n, "covered": c, "reason": reason, "warn": warn}
        )
    return {
        "params": total,
        "covered": covered,
        "share": covered / total if total else 0.0,
        "attributable": attributable,
        "attributable_share": covered / attributable if attributable else 0.0,
        "by_kind": {k: v for k, v in by_kind.items() if v},
        "untracked": untracked,
    }


def warn_untracked(model: nn.Module, layers: dict[str, LayerAdapter]) -> None:
    """``UntrackedWarning`` naming every weight-bearing parameter that no tracked layer covers.

    Embedding tables, norm scales and other vectors are not warned about (their influence is
    not attributed either; ``coverage`` lists them). On a PEFT model the frozen base weights
    are left out on purpose and only trainable parameters count.
    """
    missed = [u for u in coverage(model, layers)["untracked"] if u["warn"]]
    if not missed:
        return
    shown = ", ".join(f"{u['name']} {tuple(u['shape'])} ({u['reason']})" for u in missed[:8])
    more = f", ... ({len(missed) - 8} more)" if len(missed) > 8 else ""
    warnings.warn(
        UntrackedWarning(
            f"modules=None leaves {len(missed)} parameter(s) of {type(model).__name__} out of attribution, because "
            f"headwater has no adapter for their modules: {shown}{more}. Their influence is not in the scores; pass "
            "an explicit list of modules to choose the layers (and silence this), or report the module type"
        ),
        stacklevel=3,
    )


def describe_layers(model: nn.Module, layers: dict[str, LayerAdapter]) -> list[dict[str, Any]]:
    """One dict per tracked layer, for ``headwater inspect`` and the report.

    ``name``, ``kind`` (``layer_kind``: attention, mlp, expert, shared-expert, router, adapter,
    other), ``adapter`` (linear, conv1d, router, expert), ``shape`` [O, I] (I counts the bias
    column), ``params`` = O * I and ``share`` of the model's parameters. ``expert`` is the expert's
    index for an expert layer (None otherwise) and ``block`` the module that holds it (the fused
    experts module, or the layer itself), so results can be summed per expert and per MoE block.
    """
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name, ad in layers.items():
        n = ad.out_features * ad.in_features
        rows.append(
            {
                "name": name,
                "kind": layer_kind(name, ad),
                "adapter": ad.kind,
                "shape": [ad.out_features, ad.in_features],
                "params": n,
                "share": n / total if total else 0.0,
                "expert": getattr(ad, "expert", None),
                "block": ad.owner(name),
            }
        )
    return rows


def _preview(names: dict, limit: int = 24) -> str:
    keys = list(names)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
