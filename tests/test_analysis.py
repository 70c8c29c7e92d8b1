"""The analyses against independent references: known distributions, hand computations, autograd."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

import headwater as hw
from _models import lm_data, lm_queries, tiny_gpt2
from headwater.analysis import (
    analyze,
    analyze_workdir,
    concentration,
    cross_query,
    fit_power_law,
    layer_blocks,
    layer_order,
    layer_profile,
    output_token_influence,
    sparsity,
    token_structure,
    top_share,
)
from headwater.storage import save_tensors


def _pareto(rng: np.random.Generator, n: int, alpha: float, xmin: float = 1.0) -> np.ndarray:
    """Inverse-CDF samples of p(x) ~ x^-alpha, x >= xmin."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


# ---------------------------------------------------------------------------- sparsity
@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5])
def test_power_law_mle_recovers_a_known_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    tail = _pareto(rng, 20_000, alpha, xmin=2.0)
    body = rng.uniform(0.01, 2.0, 8_000)  # not a power law: the xmin search must cut it off
    fit = fit_power_law(np.concatenate([tail, body, -body]))  # negatives are ignored
    assert abs(fit.alpha - alpha) < 4 * (alpha - 1) / math.sqrt(20_000)
    assert 1.9 < fit.xmin < 2.6  # cuts off the uniform body; KS-chosen xmin is noisy upwards
    assert fit.n_positive == 28_000
    fixed = fit_power_law(tail, xmin=2.0)
    closed_form = 1 + tail.size / np.log(tail / tail.min()).sum()  # the MLE with xmin = the sample minimum
    assert fixed.alpha == pytest.approx(closed_form, rel=1e-12)


def test_power_law_ks_statistic_matches_scipy():
    rng = np.random.default_rng(1)
    x = np.concatenate([_pareto(rng, 3000, 2.7), rng.uniform(0.05, 1, 500)])
    fit = fit_power_law(x)
    tail = x[x >= fit.xmin]
    ref = scipy.stats.kstest(tail, scipy.stats.pareto(b=fit.alpha - 1, scale=fit.xmin).cdf).statistic
    assert fit.ks == pytest.approx(ref, rel=1e-9)
    assert fit.n_tail == tail.size


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # powerlaw 2.0 warns about its own internals
def test_power_law_matches_the_powerlaw_package():
    powerlaw = pytest.importorskip("powerlaw")
    rng = np.random.default_rng(2)
    x = np.concatenate([_pareto(rng, 1500, 2.3, xmin=0.5), rng.uniform(0.01, 0.5, 700)])
    theirs = powerlaw.Fit(x, verbose=False)
    at_their_xmin = fit_power_law(x, xmin=theirs.xmin)
    assert at_their_xmin.alpha == pytest.approx(theirs.power_law.alpha, rel=1e-9)
    assert at_their_xmin.n_tail == theirs.n_tail
    # powerlaw measures KS at the data points only, one-sided; ours is the two-sided sup (as scipy), so the
    # chosen xmin may differ by a few ranks
    ours = fit_power_law(x, max_candidates=10**9)  # every distinct value as a candidate, as powerlaw does
    assert ours.xmin == pytest.approx(theirs.xmin, rel=0.02)
    assert ours.alpha == pytest.approx(theirs.power_law.alpha, abs=2 * theirs.power_law.standard_err)


def test_bootstrap_p_value_does_not_reject_a_true_power_law():
    rng = np.random.default_rng(3)
    fit = fit_power_law(np.concatenate([_pareto(rng, 400, 2.5), rng.uniform(0.1, 1, 200)]), bootstrap=40, seed=0)
    assert 0.1 < fit.p_value <= 1.0


def test_tail_points_are_the_empirical_ccdf():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, -3.0])
    fit = fit_power_law(x)
    for xv, p in fit.tail:
        assert p == pytest.approx(np.mean(x[x > 0] >= xv))


def test_top_share_counts_the_top_one_percent_of_all_sequences():
    row = np.r_[100.0, np.ones(99)]  # 100 sequences: the top 1% is one sequence
    assert top_share(row) == pytest.approx(100 / 199)
    row = np.r_[50.0, 30.0, -1000.0 * np.ones(198)]  # 200 sequences: top 1% = 2; negatives hold nothing positive
    assert top_share(row) == pytest.approx(1.0)
    assert top_share(-np.ones(10)) is None


def test_sparsity_uses_only_candidates():
    rng = np.random.default_rng(4)
    values = torch.tensor(rng.standard_normal((2, 300)))
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, :100] = True
    mask[1, 50:] = True
    res = sparsity(values, mask)
    assert [r["n_scored"] for r in res["per_query"]] == [100, 250]
    assert res["per_query"][0]["n_positive"] == int((values[0, :100] > 0).sum())
    assert res["per_query"][1]["top1pct_share"] == pytest.approx(top_share(values[1, 50:].numpy()))
    json.dumps(res, allow_nan=False)


# ---------------------------------------------------------------------------- layers
def test_layer_order_and_blocks():
    names = ["h.10.mlp.c_proj", "h.2.mlp.c_fc", "h.2.mlp.c_proj", "h.10.mlp.c_fc", "h.1.mlp.c_fc"]
    assert layer_order(names) == ["h.1.mlp.c_fc", "h.2.mlp.c_fc", "h.2.mlp.c_proj", "h.10.mlp.c_fc", "h.10.mlp.c_proj"]
    blocks = layer_blocks([f"l{i}" for i in range(20)], 9)
    assert [len(b) for b in blocks] == [3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert sum(blocks, []) == [f"l{i}" for i in range(20)]
    assert layer_blocks(["a", "b"], 9) == [["a"], ["b"]]


def test_layer_profile_matches_a_hand_computation():
    # 4 layers in 2 blocks, 2 queries, 3 sequences; top_k = 2 by total influence
    per_layer = {
        "l0": torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 1.0]]),
        "l1": torch.tensor([[1.0, 1.0, 0.1], [0.5, 0.0, -1.0]]),
        "l2": torch.tensor([[2.0, 4.0, 0.1], [-1.0, 3.0, 1.0]]),
        "l3": torch.tensor([[0.0, 1.0, 0.1], [3.0, 0.0, 1.0]]),
    }
    # totals: q0 = [4, 4, 0.3] -> top 2 = {0, 1}; q1 = [3, 3, 2] -> top 2 = {0, 1}
    res = layer_profile(per_layer, n_blocks=2, top_k=2)
    assert res["blocks"] == [["l0", "l1"], ["l2", "l3"]]
    q0_b0 = 1 + 2 + 1 + 1  # |l0| + |l1| over sequences 0, 1
    q0_b1 = 2 + 4 + 0 + 1
    q1_b0 = 0.5 + 0 + 0.5 + 0
    q1_b1 = 1 + 3 + 3 + 0
    assert res["per_query"][0] == pytest.approx([q0_b0 / (q0_b0 + q0_b1), q0_b1 / (q0_b0 + q0_b1)])
    assert res["per_query"][1] == pytest.approx([q1_b0 / (q1_b0 + q1_b1), q1_b1 / (q1_b0 + q1_b1)])
    assert res["mean"] == pytest.approx(np.mean(res["per_query"], axis=0).tolist())
    for fr in res["per_query"]:
        assert sum(fr) == pytest.approx(1.0)
    masked = layer_profile(per_layer, n_blocks=2, top_k=2, candidate_mask=torch.tensor([[False, True, True]] * 2))
    q0_b0, q0_b1 = 2 + 1 + 0 + 0.1, 4 + 1 + 0.1 + 0.1  # sequences 1 and 2 for q0
    assert masked["per_query"][0] == pytest.approx([q0_b0 / (q0_b0 + q0_b1), q0_b1 / (q0_b0 + q0_b1)])
    zero = layer_profile({"a": torch.zeros(1, 3)}, n_blocks=1)
    assert zero["per_query"] == [None] and zero["mean"] is None


# ---------------------------------------------------------------------------- tokens
def test_concentration_on_constructed_vectors():
    vecs = [[1.0, 0, 0, 0], [1.0, 1, 1, 1], [3.0, -1], [1.0, 1], [0.0, 0]]
    expected = [1.0, 0.5, math.sqrt(10) / 4, 1 / math.sqrt(2), 0.0]
    np.testing.assert_allclose(concentration(np.array([v + [0] * (4 - len(v)) for v in vecs])), expected)
    # flagged above 2/3: a single token, and 3:-1; not four equal tokens; two equal tokens (0.707) too
    per_token = torch.tensor([[v + [0] * (4 - len(v)) for v in vecs[:4]]])
    res = token_structure(per_token, top_k=4)
    by_index = {r["index"]: r for r in res["per_query"][0]}
    assert [by_index[i]["flagged"] for i in range(4)] == [True, False, True, True]
    assert by_index[2]["top_token"] == 0 and by_index[2]["top_token_share"] == pytest.approx(0.75)
    assert res["n_flagged"] == 3 and res["n_examined"] == 4


def test_output_token_influence_matches_autograd():
    # identity curvature: influence of token t = <grad f_q, grad l_t> over the tracked layers' parameters
    model = tiny_gpt2()
    task = hw.LanguageModelingTask()
    train, queries = lm_data(2, lo=4, hi=6), lm_queries(2)
    an = hw.Attributor(model, task=task, strategy="identity", modules="mlp")
    per_tok = output_token_influence(an, queries, train, batch_size=4)
    params = [p for name in an.layers for p in model.get_submodule(name).parameters()]
    q_grads = [torch.autograd.grad(task.measurement(model, task.collate([q])), params) for q in queries]
    for m, item in enumerate(train):
        ids = item["input_ids"]
        logits = model(input_ids=ids[None]).logits[0]
        assert per_tok[m].shape == (2, ids.shape[0])
        for t in range(1, ids.shape[0]):
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[t - 1], ids[t]), params, retain_graph=True)
            ref = [sum((a * b).sum() for a, b in zip(gq, g, strict=True)) for gq in q_grads]
            ref = torch.stack(ref).detach().numpy()
            np.testing.assert_allclose(per_tok[m][:, t], ref, rtol=1e-6, atol=1e-6)  # the task's loss is fp32
        assert not per_tok[m][:, 0].any()


def test_output_token_influence_sums_to_the_sequence_influence():
    model = tiny_gpt2()
    train, queries = lm_data(6, hi=7), lm_queries(2)
    an = hw.Attributor(model, strategy="ekfac", modules="mlp", fisher="empirical").fit(train, batch_size=3)
    full = an.scores(queries, train[:2], batch_size=3).values.numpy()
    per_tok = output_token_influence(an, queries, train[:2], batch_size=3)
    np.testing.assert_allclose(np.stack([p.sum(1) for p in per_tok], 1), full, rtol=1e-8)


# ---------------------------------------------------------------------------- across queries
def test_cross_query_overlap_on_constructed_top_sets():
    values = torch.zeros(3, 8)
    values[0, [0, 1, 2]] = torch.tensor([3.0, 2.0, 1.0])
    values[1, [1, 2, 3]] = torch.tensor([3.0, 2.0, 1.0])
    values[2, [5, 6, 1]] = torch.tensor([3.0, 2.0, 1.0])
    res = cross_query(values, k=3)
    sets = [{0, 1, 2}, {1, 2, 3}, {1, 5, 6}]
    assert [set(t) for t in res["top"]] == sets
    jac = [[len(a & b) / len(a | b) for b in sets] for a in sets]
    np.testing.assert_allclose(res["jaccard"], jac)
    assert res["mean_jaccard"] == pytest.approx((2 * 0.5 + 2 * 0.2 + 2 * 0.2) / 6)
    assert res["shared"] == [{"index": 1, "queries": 3, "share": 1.0}, {"index": 2, "queries": 2, "share": 2 / 3}]
    masked = cross_query(values, k=3, candidate_mask=torch.tensor([[True, True] + [False] * 6] * 3))
    assert [set(t) for t in masked["top"]] == [{0, 1}] * 3  # only two candidates each


# ---------------------------------------------------------------------------- end to end
def _saved_run(tmp_path, with_results: int | None = None):
    rng = np.random.default_rng(5)
    q, n, t = 3, 400, 6
    names = ["h.10.mlp", "h.2.mlp", "h.1.mlp"]
    per_layer = {k: torch.tensor(rng.standard_t(2, (q, n))) for k in names}
    values = sum(per_layer.values())
    per_token = torch.tensor(rng.standard_normal((q, n, t)))
    per_token = per_token - per_token.mean(2, keepdim=True) + values[..., None] / t  # sums to values
    scores = hw.Scores(values, per_layer, per_token, {})
    save_tensors(tmp_path / "scores.safetensors", scores.tensors())
    if with_results is not None:
        (tmp_path / "results.jsonl").write_text("".join(json.dumps({"query": i}) + "\n" for i in range(with_results)))
    return scores


def test_analyze_workdir_round_trip(tmp_path):
    scores = _saved_run(tmp_path, with_results=3)
    res = analyze_workdir(tmp_path, n_blocks=3)
    json.dumps(res, allow_nan=False)
    assert res["layers"]["blocks"] == [["h.1.mlp"], ["h.2.mlp"], ["h.10.mlp"]]  # model order, not file order
    assert res["n_queries"] == 3 and res["n_train"] == 400
    in_memory = analyze(scores, n_blocks=3)
    assert res["sparsity"] == in_memory["sparsity"] and res["cross_query"] == in_memory["cross_query"]
    assert res["tokens"] == in_memory["tokens"]
    order = ["h.2.mlp", "h.10.mlp", "h.1.mlp"]  # a recorded model order wins over natural sort
    save_tensors(tmp_path / "scores.safetensors", scores.tensors(), {"layers": order})
    assert analyze_workdir(tmp_path, n_blocks=3)["layers"]["blocks"] == [[n] for n in order]
    mask = torch.zeros(3, 400, dtype=torch.bool)
    mask[:, :50] = True  # as candidate filtering saves it: only these entries were scored
    save_tensors(tmp_path / "scores.safetensors", {**scores.tensors(), "mask": mask})
    res = analyze_workdir(tmp_path)
    assert [r["n_scored"] for r in res["sparsity"]["per_query"]] == [50, 50, 50]
    assert all(i < 50 for top in res["cross_query"]["top"] for i in top)


def test_analyze_command_mounts_on_typer(tmp_path):
    from typer.testing import CliRunner

    from headwater.cli import app

    _saved_run(tmp_path)
    out = CliRunner().invoke(app, ["analyze", str(tmp_path), "--blocks", "2", "--top-k", "5"])
    assert out.exit_code == 0, out.output
    assert "sparsity" in out.output and "cross-query" in out.output
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert len(saved["layers"]["blocks"]) == 2 and saved["cross_query"]["k"] == 5


def test_workdir_errors_and_query_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores.safetensors does not exist"):
        analyze_workdir(tmp_path)
    _saved_run(tmp_path, with_results=2)  # not one row per query: ignored, not guessed at
    assert analyze_workdir(tmp_path)["query_labels"] is None
    (tmp_path / "results.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    assert analyze_workdir(tmp_path)["query_labels"] == ["q0", "q1", "q2"]


def test_token_structure_from_results_rows(tmp_path):
    # scored without per-token tensors: the token scores `headwater score` keeps for its top sequences are used
    scores = _saved_run(tmp_path)
    save_tensors(tmp_path / "scores.safetensors", {"values": scores.values})
    tokens = [[0.0, 5.0, 0.1], [0.0, 1.0, 1.0, 1.0, 1.0], [0.0, 3.0, -1.0]]
    rows = [{"prompt": "p", "top": [{"index": i, "score": 1.0, "token_scores": t} for i, t in enumerate(tokens)]}] * 3
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = analyze_workdir(tmp_path)["tokens"]
    ratios = [np.linalg.norm(t) / np.abs(t).sum() for t in map(np.array, tokens)]
    assert [e["ratio"] for e in res["per_query"][0]] == pytest.approx(ratios)
    assert [e["flagged"] for e in res["per_query"][0]] == [r > 2 / 3 for r in ratios] == [True, False, True]
    assert res["n_flagged"] == 6 and res["n_examined"] == 9


def test_output_token_influence_errors():
    model = tiny_gpt2()
    an = hw.Attributor(model, strategy="identity", modules="mlp")
    masked = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, -100, -100])}]
    with pytest.raises(ValueError, match="no training token is scored"):
        output_token_influence(an, lm_queries(1), masked)
    an_cls = hw.Attributor(model, task=hw.ClassificationTask(), strategy="identity", modules="mlp")
    with pytest.raises(ValueError, match="needs a language-modelling task"):
        output_token_influence(an_cls, lm_queries(1), [(torch.zeros(2), torch.tensor(0))])
