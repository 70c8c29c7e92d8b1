"""Tiny random configs of the Hugging Face families headwater supports, for the coverage matrix.

Every family is built in float64 with hidden size 16-32, one or two layers and a 64-token
vocabulary, untied embeddings (a tied ``lm_head`` also receives the embedding's gradient, which
no linear-layer hook sees, so autograd's ``.grad`` would differ from what is attributed) and no
dropout. A family that the installed ``transformers`` lacks is reported by ``build`` as missing,
so its test is skipped with the reason.

Also here: the exact reference for any tracked layer, experts included (``autograd_grads``),
because ``tests/_reference.py`` resolves layers by module name and fused experts are slices of
a 3-D parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 64
D = 16

# kwargs shared by the Llama-like configs (names as most decoder configs spell them)
_LLAMA = dict(
    hidden_size=D,
    intermediate_size=2 * D,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
# float64 needs the eager or batched experts: torch's grouped_mm (the CPU default) takes float32/16 only
_MOE = dict(num_hidden_layers=1, num_experts_per_tok=2, experts_implementation="eager")


@dataclass(frozen=True)
class Family:
    """One row of the matrix: ``config`` and ``model`` are class names in ``transformers``."""

    name: str
    config: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "causal-lm"  # "causal-lm" | "seq-cls" | "seq2seq"
    lora: bool = False  # wrap in a peft LoRA model
    rtol: float = 1e-7  # float64 default; routers that compute in float32 need more
    note: str = ""


DECODERS = [
    Family("GPT-2", "GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_layer=2, n_head=2, n_positions=32)),
    Family(
        "GPT-Neo",
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=D,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=32,
        ),
    ),
    Family(
        "GPT-NeoX",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=D,
            intermediate_size=2 * D,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
    ),
    Family("GPT-J", "GPTJConfig", "GPTJForCausalLM", dict(n_embd=D, n_layer=2, n_head=2, rotary_dim=4, n_positions=32)),
    Family("Llama", "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA)),
    Family("Mistral", "MistralConfig", "MistralForCausalLM", dict(_LLAMA)),
    Family("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA)),
    Family("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=8)),
    Family("Phi", "PhiConfig", "PhiForCausalLM", dict(_LLAMA)),
    Family("Phi-3", "Phi3Config", "Phi3ForCausalLM", dict(_LLAMA, pad_token_id=0)),
    Family("Gemma", "GemmaConfig", "GemmaForCausalLM", dict(_LLAMA, head_dim=8)),
    Family("Gemma 2", "Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA, head_dim=8, sliding_window=4)),
    Family("Gemma 3", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(_LLAMA, head_dim=8, sliding_window=4)),
    Family("BLOOM", "BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=2, n_head=2)),
    Family(
        "MPT",
        "MptConfig",
        "MptForCausalLM",
        dict(d_model=D, n_layers=2, n_heads=2, max_seq_len=32),
        rtol=1e-6,
        note="attention softmax in float32: padding changes its rounding",
    ),
    Family("StableLM", "StableLmConfig", "StableLmForCausalLM", dict(_LLAMA)),
    Family(
        "Falcon",
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, new_decoder_architecture=False),
    ),
    Family("OLMo", "OlmoConfig", "OlmoForCausalLM", dict(_LLAMA)),
    Family("OLMo 2", "Olmo2Config", "Olmo2ForCausalLM", dict(_LLAMA)),
    Family("Starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM", dict(_LLAMA)),
    Family(
        "CodeGen",
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(n_embd=D, n_layer=2, n_head=2, rotary_dim=4, n_positions=32, n_ctx=32),
    ),
    Family(
        "GPT-BigCode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=D, n_layer=2, n_head=2, n_positions=32)
    ),
    Family("Granite", "GraniteConfig", "GraniteForCausalLM", dict(_LLAMA)),
    Family("Cohere", "CohereConfig", "CohereForCausalLM", dict(_LLAMA)),
    Family(
        "OPT",
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=D,
            ffn_dim=2 * D,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=D,
        ),
        note="fc1/fc2 run on [N*S, d]",
    ),
    Family(
        "Qwen2-MoE",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_LLAMA, **_MOE, num_experts=4, moe_intermediate_size=D, shared_expert_intermediate_size=D),
        note="fused experts + shared expert on [N*S, d]",
    ),
    Family(
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_LLAMA, **_MOE, num_local_experts=4),
        note="fused experts",
    ),
    Family(
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_LLAMA, **_MOE, num_experts=4, moe_intermediate_size=D, head_dim=8, norm_topk_prob=True),
        note="fused experts",
    ),
    Family(
        "OLMoE",
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(_LLAMA, **_MOE, num_experts=4),
        note="fused experts",
    ),
    Family(
        "DeepSeek-V2",
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _LLAMA,
            **_MOE,
            num_experts=4,
            n_routed_experts=4,
            moe_intermediate_size=D,
            n_shared_experts=1,
            first_k_dense_replace=0,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
        ),
        rtol=1e-5,
        note="fused experts; router logits in float32",
    ),
    Family(
        "DeepSeek-V3",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _LLAMA,
            **_MOE,
            n_routed_experts=4,
            moe_intermediate_size=D,
            n_shared_experts=1,
            first_k_dense_replace=0,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
        rtol=1e-5,
        note="fused experts; router logits in float32",
    ),
]

# Beyond the list: GPT-OSS stores its experts transposed ([E, in, out]) with biases and an
# interleaved, clamped gate, and its router has a bias: the other paths of the expert adapter.
EXTRAS = [
    Family(
        "GPT-OSS",
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            _LLAMA,
            **_MOE,
            num_local_experts=4,
            head_dim=8,
            intermediate_size=D,
            layer_types=["full_attention"],
            sliding_window=4,
            max_position_embeddings=4096,  # YaRN's original length, so the rope is not rescaled (and not warned)
        ),
        note="fused experts, transposed, with biases",
    ),
]

ENCODERS = [
    Family(
        "BERT",
        "BertConfig",
        "BertForSequenceClassification",
        dict(
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * D,
            max_position_embeddings=32,
            num_labels=3,
        ),
        kind="seq-cls",
    ),
    Family(
        "RoBERTa",
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * D,
            max_position_embeddings=40,
            num_labels=3,
            pad_token_id=1,
        ),
        kind="seq-cls",
    ),
    Family(
        "DistilBERT",
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(dim=D, n_layers=2, n_heads=2, hidden_dim=2 * D, max_position_embeddings=32, num_labels=3),
        kind="seq-cls",
    ),
]

SEQ2SEQ = [
    Family(
        "T5",
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            d_model=D,
            d_kv=8,
            d_ff=2 * D,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        kind="seq2seq",
    ),
    Family(
        "BART",
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            d_model=D,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=2 * D,
            decoder_ffn_dim=2 * D,
            max_position_embeddings=32,
            decoder_start_token_id=2,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            forced_eos_token_id=None,
        ),
        kind="seq2seq",
    ),
]

LORA = [
    Family("Llama + LoRA", "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA), lora=True),
    Family(
        "GPT-2 + LoRA", "GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_layer=2, n_head=2, n_positions=32), lora=True
    ),
]

ALL = DECODERS + EXTRAS + ENCODERS + SEQ2SEQ + LORA

_NO_DROPOUT = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
    "dropout_rate",
    "activation_dropout",
    "seq_classif_dropout",
    "qa_dropout",
    "resid_dropout",
    "emb_pdrop",
    "embed_dropout",
    "classifier_dropout",
    "summary_first_dropout",
)


def missing(family: Family) -> str | None:
    """Why this ``transformers`` cannot build the family, or None."""
    import transformers

    lacks = [c for c in (family.config, family.model) if not hasattr(transformers, c)]
    if lacks:
        return f"transformers {transformers.__version__} has no {', '.join(lacks)}"
    if family.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
    return None


def build(family: Family, seed: int = 0) -> nn.Module:
    """The family's tiny model in float64 and eval mode, with random weights of a useful scale.

    Routers are re-drawn with unit scale so that top-k routing spreads tokens over the experts
    (some families initialize them to zero, which routes every token to the same experts).
    """
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    kwargs.update(family.kwargs)
    config = getattr(transformers, family.config)(**kwargs)
    for key in _NO_DROPOUT:
        if hasattr(config, key) and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)
    model = getattr(transformers, family.model)(config).to(torch.float64).eval()
    untie(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and "shared_expert" not in name:
                p.normal_(0.0, 1.0)
    if family.lora:
        model = lora(model, family)
    return model


def untie(model: nn.Module) -> None:
    """Give the output layer its own weight where the family ties it to the embedding regardless of
    the config (T5 in transformers 5): the exact reference reads ``.grad``, which would include
    the embedding's use that headwater does not attribute (it warns about it instead)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        out.weight = nn.Parameter(out.weight.detach().clone())


def lora(model: nn.Module, family: Family) -> nn.Module:
    """A LoRA model on attention and MLP projections, with B drawn at random (peft starts it at 0,
    which would make every adapter's A gradient vanish and test nothing)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"] if "Llama" in family.config else ["c_attn", "c_fc"]
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out="GPT2" in family.config
    )
    model = get_peft_model(model, cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model


# ---------------------------------------------------------------------------------------- data


def lm_data(n: int, seed: int = 1, lo: int = 3, hi: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, VOCAB, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g)}
        for _ in range(n)
    ]


def lm_queries(n: int, seed: int = 2) -> list[dict]:
    out = []
    for item in lm_data(n, seed=seed, lo=4, hi=5):
        labels = item["input_ids"].clone()
        labels[:2] = -100
        out.append({"input_ids": item["input_ids"], "labels": labels})
    return out


def cls_data(n: int, classes: int = 3, seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids["input_ids"], "label": int(torch.randint(0, classes, (), generator=g))}
        for ids in lm_data(n, seed=seed)
    ]


def seq2seq_data(n: int, seed: int = 4) -> list[dict]:
    src, tgt = lm_data(n, seed=seed, lo=3, hi=6), lm_data(n, seed=seed + 1, lo=2, hi=4)
    return [{"input_ids": s["input_ids"], "labels": t["input_ids"]} for s, t in zip(src, tgt)]


def data_for(family: Family, n: int, queries: bool = False) -> list[dict]:
    if family.kind == "seq-cls":
        return cls_data(n, seed=7 if queries else 3)
    if family.kind == "seq2seq":
        return seq2seq_data(n, seed=8 if queries else 4)
    return lm_queries(n) if queries else lm_data(n)


def task_for(family: Family) -> Any:
    import headwater as hw
    from headwater.task import Seq2SeqTask, SequenceClassificationTask

    if family.kind == "seq-cls":
        return SequenceClassificationTask()
    if family.kind == "seq2seq":
        return Seq2SeqTask()
    return hw.LanguageModelingTask()


# ----------------------------------------------------------------------------------- reference


def autograd_grads(model: nn.Module, task: Any, data: list, layers: dict, measurement: bool = False) -> torch.Tensor:
    """[N, P] per-example gradients from ``loss.backward()`` on the unmodified model (no capture),
    read from ``.grad`` through each adapter (an expert's slice of the fused 3-D parameter)."""
    rows = []
    for item in data:
        model.zero_grad(set_to_none=True)
        batch = task.collate([item])
        out = task.measurement(model, batch) if measurement else task.loss(model, batch, sample=False)
        out.backward()
        rows.append(
            torch.cat([ad.weight_grad(model.get_submodule(ad.owner(n))).reshape(-1) for n, ad in layers.items()])
        )
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)
