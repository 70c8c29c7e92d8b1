"""Fused MoE experts as layers: naming, exactness against autograd, routing edge cases, own factors.

References are autograd's per-example gradients of each expert's slice of the fused 3-D
parameters, taken on the model without any capture (``_families.autograd_grads``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import headwater as hw
from _families import ALL, autograd_grads, build, lm_data, lm_queries, missing
from headwater.curvature import CovarianceAccumulator
from headwater.engine import Capture, run_pass
from headwater.experts import ExpertAdapter
from headwater.layers import describe_layers, layer_kind, select_layers

MOE = [f for f in ALL if "fused" in f.note]
_mixtral = next(f for f in MOE if f.name == "Mixtral")
_qwen2_moe = next(f for f in MOE if f.name == "Qwen2-MoE")


def _family(family, **changes):
    if missing(family):
        pytest.skip(missing(family))
    return dataclasses.replace(family, kwargs={**family.kwargs, **changes})


def _logits(model, data):
    batch = hw.LanguageModelingTask().collate(data)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch


# ------------------------------------------------------------------------------ the layers


def test_each_expert_projection_is_its_own_layer_and_mlp_includes_experts_and_shared_experts():
    model = build(_family(_qwen2_moe))
    layers = select_layers(model, None)
    prefix = "model.layers.0.mlp"
    for e in range(4):
        up, down = layers[f"{prefix}.experts.{e}.gate_up_proj"], layers[f"{prefix}.experts.{e}.down_proj"]
        assert isinstance(up, ExpertAdapter) and (up.expert, up.out_features, up.in_features) == (e, 32, 16)
        assert (down.out_features, down.in_features) == (16, 16)
    assert layers[f"{prefix}.gate"].kind == "router"
    kinds = {n: layer_kind(n, ad) for n, ad in layers.items()}
    assert kinds[f"{prefix}.gate"] == kinds[f"{prefix}.shared_expert_gate"] == "router"
    assert kinds[f"{prefix}.shared_expert.down_proj"] == "shared-expert"
    assert kinds["model.layers.0.self_attn.q_proj"] == "attention"
    mlp = select_layers(model, "mlp")
    assert {kinds[n] for n in mlp} == {"expert", "shared-expert"}
    assert len([n for n in mlp if kinds[n] == "expert"]) == 8 and len(mlp) == 11
    rows = {r["name"]: r for r in describe_layers(model, layers)}
    assert rows[f"{prefix}.experts.2.down_proj"]["expert"] == 2
    assert rows[f"{prefix}.experts.2.down_proj"]["block"] == f"{prefix}.experts"
    assert rows[f"{prefix}.experts.2.down_proj"]["params"] == 16 * 16


def test_naming_the_fused_module_selects_all_its_experts_and_one_expert_can_be_chosen():
    model = build(_family(_mixtral))
    layers = select_layers(model, ["model.layers.0.mlp.experts"])
    assert len(layers) == 8 and all(ad.kind == "expert" for ad in layers.values())
    one = select_layers(model, ["model.layers.0.mlp.experts.1.down_proj"])
    an = hw.Attributor(model, strategy="identity", modules=list(one))
    train, queries = lm_data(3), lm_queries(2)
    ref = autograd_grads(model, hw.LanguageModelingTask(), queries, an.layers, measurement=True)
    ref = ref @ autograd_grads(model, hw.LanguageModelingTask(), train, an.layers).T
    torch.testing.assert_close(an.scores(queries, train, batch_size=2).values, ref)


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
@pytest.mark.parametrize("family", MOE, ids=[f.name for f in MOE])
def test_every_expert_matches_autograd_and_outputs_are_unchanged(family, impl):
    model = build(_family(family, experts_implementation=impl))
    train, queries = lm_data(4), lm_queries(2)
    layers = select_layers(model, None)
    before, batch = _logits(model, train)
    with Capture(model, layers):
        during, _ = _logits(model, train)
    assert torch.equal(before, during)  # bit for bit: the fused values are kept, only gradients are rerouted
    an = hw.Attributor(model, strategy="identity", modules=None)
    res = an.scores(queries, train, batch_size=3, per_layer=True)
    task = hw.LanguageModelingTask()
    experts = [n for n, ad in an.layers.items() if ad.kind == "expert"]
    for name in experts + [n for n, ad in an.layers.items() if ad.kind == "router"]:
        ref = autograd_grads(model, task, queries, {name: an.layers[name]}, measurement=True)
        ref = ref @ autograd_grads(model, task, train, {name: an.layers[name]}).T
        torch.testing.assert_close(res.per_layer[name], ref, rtol=family.rtol, atol=1e-12, msg=name)
    assert sum(res.per_layer[n].abs().sum() > 0 for n in experts) >= len(experts) // 2  # routing reaches experts


def test_float32_grouped_mm_keeps_outputs_and_matches_the_eager_float64_scores():
    """The CPU default (torch's grouped_mm, float32 only) is recomputed per expert to float32 rounding."""
    fam = _family(_mixtral, experts_implementation="grouped_mm")
    model = build(fam).float()
    train, queries = lm_data(3), lm_queries(2)
    before, _ = _logits(model, train)
    with Capture(model, select_layers(model, "mlp")):
        during, _ = _logits(model, train)
    assert torch.equal(before, during)
    low = hw.Attributor(model, strategy="identity", modules="mlp").scores(queries, train, batch_size=3).values
    ref = hw.Attributor(build(_family(_mixtral)), strategy="identity", modules="mlp").scores(queries, train).values
    torch.testing.assert_close(low.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())


# ------------------------------------------------------------------------------- routing


class RoutedToy(nn.Module):
    """Embedding -> Mixtral's fused experts under a rule-based router -> head, with routing we control.

    Tokens with id < 8 may not go to expert 3 (its logit is -inf) and the others always do (+10),
    so a batch of low ids leaves expert 3 without any token; id 1 sends its second slot to the
    sentinel E (dropped, as expert parallelism does), so that token reaches one expert only.
    """

    def __init__(self, vocab: int = 16, d: int = 6, experts: int = 4, seed: int = 0):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        super().__init__()
        torch.manual_seed(seed)
        cfg = MixtralConfig(
            hidden_size=d,
            intermediate_size=5,
            num_local_experts=experts,
            num_experts_per_tok=2,
            experts_implementation="eager",
        )
        self.embed = nn.Embedding(vocab, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = MixtralExperts(cfg)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.experts.gate_up_proj.normal_(0, 0.5)
            self.experts.down_proj.normal_(0, 0.5)
        self.double()

    def route(self, input_ids: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.reshape(-1)
        extra = torch.zeros_like(logits)
        extra[:, 3] = torch.where(ids < 8, float("-inf"), 10.0)
        logits = logits + extra
        weights, index = torch.softmax(logits, -1).topk(2, dim=-1)
        index = torch.where((ids == 1)[:, None] & (torch.arange(2) == 1), logits.shape[1], index)
        return weights, index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        flat = h.reshape(-1, h.shape[-1])
        weights, index = self.route(input_ids, self.router(flat))
        return self.head(torch.tanh(h + self.experts(flat, index, weights).reshape(h.shape)))


def _toy_data():
    low = [{"input_ids": torch.tensor(t)} for t in ([1, 2, 3, 4], [5, 6, 7], [2, 2, 1, 3, 4])]
    high = [{"input_ids": torch.tensor(t)} for t in ([9, 12, 1, 15], [11, 3, 14])]
    return low + high  # batch_size=3: the first batch routes nothing to expert 3


def test_an_expert_without_tokens_contributes_zero_and_dropped_tokens_reach_one_expert():
    model, task = RoutedToy(), hw.LanguageModelingTask()
    train, queries = (
        _toy_data(),
        [{"input_ids": torch.tensor([9, 1, 13, 2]), "labels": torch.tensor([-100, -100, 13, 2])}],
    )
    an = hw.Attributor(model, task=task, strategy="identity", modules=["experts", "router", "head"])
    res = an.scores(queries, train, batch_size=3, per_layer=True)
    ref = (
        autograd_grads(model, task, queries, an.layers, measurement=True)
        @ autograd_grads(model, task, train, an.layers).T
    )
    torch.testing.assert_close(res.values, ref)
    assert (res.per_layer["experts.3.down_proj"][:, :3] == 0).all()  # no token of the first batch reaches expert 3
    assert (res.per_layer["experts.3.down_proj"][:, 3:] != 0).all()

    # covariance counts: every scored token routed to the expert, counted by the routing rule itself
    cov = run_pass(
        model,
        task,
        an.layers,
        train,
        CovarianceAccumulator(an.shapes),
        losses=lambda b: [task.loss(model, b)],
        batch_size=3,
        phase="covariance",
    )
    expected = torch.zeros(4)
    for item in train:
        ids = item["input_ids"][:-1]  # the positions that predict a label
        with torch.no_grad():
            _, index = model.route(ids, model.router(model.embed(ids)))
        expected += torch.bincount(index.reshape(-1), minlength=5)[:4]
    for e in range(4):
        counts = cov.get(f"experts.{e}.down_proj", "counts")
        assert counts[0].item() == expected[e].item() and counts[1].item() == len(train)


def test_packed_positions_name_each_routed_token():
    """The rows packed for an expert are the router's inputs at the positions they claim, exactly the
    tokens whose top-k holds that expert; fold_tokens puts every value back on its token."""
    model, task = RoutedToy(), hw.LanguageModelingTask()
    layers = select_layers(model, ["router", "experts"])
    batch = task.collate(_toy_data())
    with Capture(model, layers) as cap:
        caps = {c.name: c for c in cap.backward(task.loss(model, batch), task.token_mask(batch))}
    x = caps["router"].a  # [N, S, d]: the hidden states both the router and the experts see
    _, index = model.route(batch["input_ids"], model.router(x.reshape(-1, x.shape[-1])))
    index = index.reshape(*x.shape[:2], 2)
    for e in range(4):
        c = caps[f"experts.{e}.gate_up_proj"]
        n, j = (c.positions >= 0).nonzero(as_tuple=True)
        t = c.positions[n, j]
        torch.testing.assert_close(c.a[n, j], x[n, t], rtol=0, atol=0)
        routed = (index == e).any(-1)  # padding is routed too (with zero gradient), as the model does
        assert sorted(zip(n.tolist(), t.tolist())) == sorted(map(tuple, routed.nonzero().tolist()))
        assert (c.a[c.positions < 0] == 0).all() and not c.mask[c.positions < 0].any()
        values = torch.randn(2, *c.positions.shape, dtype=torch.float64)
        folded = c.fold_tokens(values)
        assert folded.shape == (2, *x.shape[:2])
        torch.testing.assert_close(folded.sum(-1), (values * (c.positions >= 0)).sum(-1))
        torch.testing.assert_close(folded[:, n, t], values[:, n, j])


def test_ekfac_gives_every_expert_its_own_factors():
    model = build(_family(_mixtral))
    train, queries = lm_data(8), lm_queries(2)
    an = hw.Attributor(model, modules="mlp", strategy="ekfac").fit(train, batch_size=4)
    curv = {n: an.curvature[n] for n in an.layers}
    assert len(curv) == 8
    q_a = [curv[f"model.layers.0.mlp.experts.{e}.down_proj"].q_a for e in range(4)]
    assert all(not torch.allclose(q_a[0], q) for q in q_a[1:])
    res = an.scores(queries, train, batch_size=4)
    assert torch.isfinite(res.values).all() and res.values.abs().sum() > 0
    # each scored token reaches exactly K = 2 experts: the experts' token counts sum to 2x the tokens
    task = hw.LanguageModelingTask()
    cov = run_pass(
        model,
        task,
        an.layers,
        train,
        CovarianceAccumulator(an.shapes),
        losses=lambda b: [task.loss(model, b)],
        batch_size=4,
        phase="covariance",
    )
    tokens = sum(len(x["input_ids"]) - 1 for x in train)
    assert sum(cov.get(f"model.layers.0.mlp.experts.{e}.down_proj", "counts")[0].item() for e in range(4)) == 2 * tokens


# ------------------------------------------------------------------------------ refusals


def test_a_fused_module_that_computes_something_else_is_an_error():
    model = RoutedToy()
    original = type(model.experts).forward

    class Doubled(type(model.experts)):
        def forward(self, *args):
            return 2 * original(self, *args)

    model.experts.__class__ = Doubled
    an = hw.Attributor(model, strategy="identity", modules=["experts"])
    with pytest.raises(ValueError, match=r"per-expert recomputation of fused experts module 'experts'.*differs"):
        an.scores([{"input_ids": torch.tensor([9, 2, 5])}], [{"input_ids": torch.tensor([9, 12, 3])}])


def test_experts_need_the_token_mask_and_an_unsharded_module():
    model = RoutedToy()
    layers = select_layers(model, ["experts"])
    ids = torch.tensor([[9, 12, 3]])
    with Capture(model, layers) as cap:
        loss = F.cross_entropy(model(ids)[0], ids[0])
        with pytest.raises(ValueError, match=r"'experts\.0\.gate_up_proj' is an expert.*token_mask"):
            list(cap.backward(loss, None))
    model.experts._is_expert_parallel = True
    with Capture(model, layers), pytest.raises(ValueError, match="expert-parallel"):
        model(ids)


def test_router_that_is_not_a_linear_map_is_an_error():
    class ScaledRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))

        def forward(self, x):
            logits = 3.0 * F.linear(x, self.weight)
            return logits, logits.softmax(-1), logits.argmax(-1)

    model = nn.Sequential()
    model.gate = ScaledRouter()
    assert select_layers(model, None)["gate"].kind == "router"
    with Capture(model, select_layers(model, None)), pytest.raises(ValueError, match=r"router 'gate'.*not F\.linear"):
        model.gate(torch.randn(2, 6, dtype=torch.float64))


def _folds_tokens() -> bool:
    import inspect

    from headwater.scoring import ScoreAccumulator

    return "fold_tokens" in inspect.getsource(ScoreAccumulator.update)


needs_fold = pytest.mark.skipif(
    not _folds_tokens(),
    reason="headwater.scoring.ScoreAccumulator does not fold per-token scores with LayerCapture.fold_tokens yet",
)


@needs_fold
def test_per_token_scores_of_an_expert_land_on_its_routed_tokens():
    model, task = RoutedToy(), hw.LanguageModelingTask()
    train = _toy_data()
    queries = [{"input_ids": torch.tensor([9, 1, 13, 2]), "labels": torch.tensor([-100, -100, 13, 2])}]
    an = hw.Attributor(model, task=task, strategy="identity", modules=["experts.3.down_proj"])
    res = an.scores(queries, train, batch_size=5, per_token=True)
    torch.testing.assert_close(res.per_token.sum(-1), res.values)
    batch = task.collate(train)
    with torch.no_grad():
        _, index = model.route(batch["input_ids"], model.router(model.embed(batch["input_ids"]).reshape(-1, 6)))
    routed = (index.reshape(*batch["input_ids"].shape, 2) == 3).any(-1)
    assert (res.per_token[:, ~routed] == 0).all() and (res.per_token[:, routed] != 0).any()


def test_malformed_expert_calls_are_errors():
    from headwater.experts import check_recomputed, forward_per_expert, routing_args

    experts = RoutedToy().experts
    hidden, index = torch.randn(3, 6, dtype=torch.float64), torch.tensor([[0, 1], [1, 2], [2, 3]])
    weights = torch.rand(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"'e' was called without \(hidden_states, top_k_index, top_k_weights\)"):
        routing_args(experts, (hidden,), {}, "e")
    assert routing_args(experts, (hidden,), {"top_k_index": index, "top_k_weights": weights}, "e")[1] is index
    with pytest.raises(ValueError, match=r"'e' got hidden states \(1, 3, 6\).*not \[T, d\] and \[T, K\]"):
        forward_per_expert(experts, hidden[None], index, weights, "e")
    out, _ = forward_per_expert(experts, hidden, index, weights, "e")
    with pytest.raises(ValueError, match=r"'e' \(MixtralExperts\) returned tuple"):
        check_recomputed(experts, out, (out,), "e")
    with pytest.raises(ValueError, match=r"the module has no .grad"):
        select_layers(RoutedToy(), ["experts"])["experts.0.down_proj"].weight_grad(experts)


class _Subset(RoutedToy):
    """Runs its experts on the first sequence's tokens only: rows that do not cover the batch."""

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        first = h[0]
        weights, index = self.route(input_ids[0], self.router(first))
        return self.head(h + self.experts(first, index, weights))


def test_experts_on_rows_that_are_not_the_batch_tokens_are_an_error():
    model, task = _Subset(), hw.LanguageModelingTask()
    batch = task.collate(_toy_data()[:2])
    with Capture(model, select_layers(model, ["experts"])) as cap:
        loss = task.loss(model, batch)
        with pytest.raises(ValueError, match=r"'experts\.0\.gate_up_proj' ran on 4 token rows, not the batch's 8"):
            list(cap.backward(loss, task.token_mask(batch)))


def test_a_router_output_that_is_not_a_tensor_is_an_error():
    class DictRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return {"logits": F.linear(x, self.weight)}

    model = nn.Sequential()
    model.router = DictRouter()
    with Capture(model, select_layers(model, None)), pytest.raises(TypeError, match=r"'router' returned dict"):
        model.router(torch.randn(2, 6))


def test_experts_that_are_separate_modules_on_routed_rows_are_named_not_tracked():
    """SwitchTransformers gathers each expert's tokens and runs a per-expert dense block on them: the
    rows carry no sequence index, so those layers are refused (warned), and the rest stays exact."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "SwitchTransformersForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no SwitchTransformers")
    from _families import seq2seq_data, untie
    from headwater.layers import UntrackedWarning, coverage
    from headwater.task import Seq2SeqTask

    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_sparse_encoder_layers=1,
        num_decoder_layers=1,
        num_sparse_decoder_layers=0,
        num_heads=2,
        num_experts=4,
        expert_capacity=8,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).double().eval()
    untie(model)  # as T5, the head is tied to the embedding regardless of the config
    with pytest.warns(UntrackedWarning, match=r"experts\.expert_0\.wi\.weight .*routed token rows"):
        layers = select_layers(model, None)
    assert not any(".experts." in n for n in layers) and any(n.endswith("router.classifier") for n in layers)
    warned = [u["name"] for u in coverage(model, layers)["untracked"] if u["warn"]]
    assert warned and all(".mlp.experts.expert_" in n for n in warned) and len(warned) % 8 == 0  # 4 x (wi, wo)
    task, train, queries = Seq2SeqTask(), seq2seq_data(3), seq2seq_data(2, seed=11)
    an = hw.Attributor(model, task=task, strategy="identity", modules=list(layers))
    ref = autograd_grads(model, task, queries, layers, measurement=True) @ autograd_grads(model, task, train, layers).T
    torch.testing.assert_close(an.scores(queries, train, batch_size=3).values, ref)


def test_the_report_sums_expert_layers_per_moe_block_and_per_expert():
    """A MoE model's layer chart: one bar per experts block (its experts' sum) and a per-expert chart."""
    import re

    from headwater.report import LayerGroups, render_report

    model = build(_family(_qwen2_moe))
    layers = select_layers(model, "mlp")
    kinds = {r["name"]: r for r in describe_layers(model, layers)}
    names = list(layers)
    per_layer = {n: float(i + 1) for i, n in enumerate(names)}  # distinct values: sums are checkable
    groups = LayerGroups(names, kinds)
    block = "model.layers.0.mlp.experts"
    experts = [n for n in names if n.startswith(block + ".")]
    assert groups.by_block(per_layer)[block] == sum(per_layer[n] for n in experts)
    for e in range(4):
        want = sum(per_layer[n] for n in experts if n.startswith(f"{block}.{e}."))
        assert groups.by_expert(per_layer)[f"expert {e}"] == want
    shared = "model.layers.0.mlp.shared_expert.down_proj"
    assert groups.by_block(per_layer)[shared] == per_layer[shared]  # not an expert: its own bar
    assert groups.names == list(dict.fromkeys(block if n in experts else n for n in names))  # model order

    entry = {"index": 0, "score": 1.0, "text": "t", "tokens": ["t"], "token_scores": [0.0], "per_layer": per_layer}
    row = {"query": 0, "prompt": "p", "completion": " c", "top": [entry], "bottom": [entry]}
    row.update(per_layer_top=per_layer, per_layer_bottom={n: -v for n, v in per_layer.items()}, stats={"n": 1})
    html = render_report([row], torch.tensor([[1.0]]), {"layer_kinds": kinds}, {"layers": names, "top_k": 1})
    titles = re.findall(r"<title>([^<]*)</title>", html)
    assert f"{block} (top 1): {groups.by_block(per_layer)[block]:+.4g}" in titles
    assert sum(t.startswith("expert ") and "(top 1)" in t for t in titles) == 4
    assert not any(t.startswith(f"{block}.0.") for t in titles), "expert layers are not drawn one by one"
    assert "11 (8 expert layers: 4 experts in 1 MoE blocks): " in html  # the summary counts them per block
    from headwater.layers import coverage

    cov = coverage(model, layers)
    settings = {"layer_kinds": kinds, "coverage": {k: cov[k] for k in ("share", "attributable_share", "untracked")}}
    html = render_report([row], torch.tensor([[1.0]]), settings, {"layers": names, "top_k": 1})
    tracked = re.search(r"<th>Tracked</th><td>([^<]*)</td>", html).group(1)
    assert tracked.startswith("8 expert, 3 shared-expert; ") and f"{cov['share']:.1%} of all parameters" in tracked
    assert "not tracked: " in tracked  # attention and routers, by name, with the reason
    # without layer kinds (an older workdir) the layers are drawn as they are
    plain = render_report([row], torch.tensor([[1.0]]), {}, {"layers": names, "top_k": 1})
    assert sum("(top 1)" in t for t in re.findall(r"<title>([^<]*)</title>", plain)) == len(names)
