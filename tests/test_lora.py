"""PEFT / LoRA models: the adapter matrices by default, the base layers on request, exact against autograd."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("peft", reason="peft is not installed (pip install peft); the LoRA tests need it")

import headwater as hw  # noqa: E402
from _families import LORA, autograd_grads, build, lm_data, lm_queries  # noqa: E402
from headwater.layers import UntrackedWarning, coverage, layer_kind, select_layers  # noqa: E402

_llama, _gpt2 = LORA


def _exact(model, layers, rtol: float = 1e-7) -> None:
    """Identity scores over ``layers`` == dot products of autograd's per-example gradients."""
    train, queries = lm_data(3), lm_queries(2)
    task = hw.LanguageModelingTask()
    res = hw.Attributor(model, strategy="identity", modules=list(layers)).scores(queries, train, batch_size=2)
    ref = autograd_grads(model, task, queries, layers, measurement=True) @ autograd_grads(model, task, train, layers).T
    torch.testing.assert_close(res.values, ref, rtol=rtol, atol=1e-12)
    assert res.values.abs().sum() > 0


@pytest.mark.parametrize("family", LORA, ids=[f.name for f in LORA])
def test_default_tracks_the_adapter_matrices_exactly(family):
    model = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrackedWarning)
        layers = select_layers(model, None)
    assert layers and all(".lora_A." in n or ".lora_B." in n for n in layers)
    assert {layer_kind(n, ad) for n, ad in layers.items()} == {"adapter"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{n}.weight" for n in layers} == trainable  # every trainable matrix, nothing frozen
    assert coverage(model, layers)["attributable_share"] == 1.0
    _exact(model, layers)


def test_mlp_picks_the_adapters_of_mlp_projections_and_base_the_layers_under_them():
    model = build(_llama)  # LoRA on q_proj, v_proj (attention) and down_proj (MLP)
    mlp = select_layers(model, "mlp")
    assert sorted({n.split(".lora_")[0].rsplit(".", 1)[1] for n in mlp}) == ["down_proj"]
    assert all(layer_kind(n, ad) == "adapter" for n, ad in mlp.items())
    base = select_layers(model, "base")
    assert not any("lora_" in n for n in base)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in base
    assert "base_model.model.model.layers.0.mlp.up_proj" in base  # not adapted: the plain layer
    assert select_layers(model, "adapters") == select_layers(model, None)


def test_base_layers_of_a_peft_model_match_autograd():
    model = build(_gpt2)  # Conv1D base layers under fan_in_fan_out adapters
    layers = select_layers(model, "base")
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # the reference reads .grad, which frozen weights do not get
        p.requires_grad_(True)
    try:
        _exact(model, layers)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    assert not any(p.requires_grad for p in frozen)


def test_ekfac_on_adapters_fits_and_scores():
    model = build(_llama)
    train = lm_data(6)
    an = hw.Attributor(model, strategy="ekfac").fit(train, batch_size=3)
    res = an.scores(lm_queries(2), train, batch_size=3, query_rank=2)
    assert torch.isfinite(res.values).all() and res.values.abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # flags restored


def test_trainable_parameters_without_an_adapter_are_named():
    from peft import LoraConfig, get_peft_model

    from _models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UntrackedWarning, match=r"lora_embedding_A.*no adapter for ParameterDict"):
        layers = select_layers(model, None)
    assert all(".lora_A." in n or ".lora_B." in n for n in layers)


def test_peft_keywords_on_a_plain_model_are_errors():
    from _models import tiny_llama

    with pytest.raises(ValueError, match=r"modules='base' selects among the layers of a PEFT model"):
        select_layers(tiny_llama(), "base")
    with pytest.raises(ValueError, match=r"modules='adapters' selects"):
        select_layers(tiny_llama(), "adapters")


def test_a_peft_model_without_trainable_or_mlp_adapters_says_what_to_pass():
    from peft import LoraConfig, get_peft_model

    from _models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"modules='mlp' found no adapters on MLP projections.*modules='base'"):
        select_layers(model, "mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"has no trainable layer that headwater supports; pass modules='base'"):
        select_layers(model, None)
    assert select_layers(model, "base")
