"""The public boundary: workdirs, reuse, resume, and clear errors on bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import headwater as hw
from _models import MLP, classification_data, lm_data, lm_queries, tiny_gpt2
from headwater.attributor import Attributor


@pytest.fixture
def gpt2():
    return tiny_gpt2()


def test_workdir_persists_factors_and_a_new_attributor_reuses_them(tmp_path, gpt2, monkeypatch):
    train, queries = lm_data(8), lm_queries(2)
    an = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path / "w").fit(train, batch_size=4)
    expected = an.scores(queries, train).values
    assert (tmp_path / "w" / "factors.safetensors").exists()
    assert (tmp_path / "w" / "config.json").exists()
    assert not list((tmp_path / "w").glob("*.part"))

    again = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path / "w")
    assert again.curvature is not None  # loaded, no fit needed
    torch.testing.assert_close(again.scores(queries, train).values, expected)
    calls = []
    monkeypatch.setattr(hw.attributor, "run_pass", lambda *a, **k: calls.append(a))  # a refit on the same data
    again.fit(train, batch_size=4)  # must not pass over it
    assert calls == []


def test_fit_resumes_from_a_saved_covariance_stage(tmp_path, gpt2, monkeypatch):
    train = lm_data(8)
    full = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path / "a").fit(train, keep_covariance=True)
    (tmp_path / "a" / "factors.safetensors").unlink()  # as if it crashed during the correction pass
    resumed = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path / "a")
    phases = []
    original = hw.attributor.run_pass
    monkeypatch.setattr(hw.attributor, "run_pass", lambda *a, **k: (phases.append(k["phase"]), original(*a, **k))[1])
    resumed.fit(train)
    assert phases == ["eigenvalue correction"]
    for name in full.layers:
        torch.testing.assert_close(resumed.curvature[name].lam, full.curvature[name].lam)


def test_workdir_from_another_model_strategy_or_module_set_is_an_error(tmp_path, gpt2):
    train = lm_data(6)
    hw.Attributor(gpt2, modules="mlp", workdir=tmp_path).fit(train)
    other = copy.deepcopy(gpt2)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    with pytest.raises(ValueError, match="another model"):
        hw.Attributor(other, modules="mlp", workdir=tmp_path)
    with pytest.raises(ValueError, match="strategy='ekfac'.*strategy='kfac'"):
        hw.Attributor(gpt2, modules="mlp", strategy="kfac", workdir=tmp_path)
    with pytest.raises(ValueError, match="another module set"):
        hw.Attributor(gpt2, modules=None, workdir=tmp_path)
    with pytest.raises(ValueError, match="fitted on other data"):
        hw.Attributor(gpt2, modules="mlp", workdir=tmp_path).fit(lm_data(6, seed=99))
    refit = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path).fit(lm_data(6, seed=99), overwrite=True)
    assert refit.fit_fingerprint is not None


def test_same_weights_in_bf16_are_the_same_model(tmp_path):
    model = tiny_gpt2(dtype=torch.float32)
    hw.Attributor(model, modules="mlp", workdir=tmp_path).fit(lm_data(4))
    hw.Attributor(copy.deepcopy(model).to(torch.bfloat16), modules="mlp", workdir=tmp_path)


def test_bad_arguments_raise_clear_errors(gpt2):
    with pytest.raises(ValueError, match="strategy='bogus' is unknown"):
        hw.Attributor(gpt2, strategy="bogus")
    with pytest.raises(ValueError, match="fisher='true' is unknown"):
        hw.Attributor(gpt2, fisher="true")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        hw.Attributor("gpt2")
    with pytest.raises(TypeError, match="task must be a headwater Task"):
        hw.Attributor(gpt2, task=object())
    with pytest.raises(ValueError, match=r"module 'transformer.h.9.mlp' does not exist.*transformer.h.0.mlp.c_fc"):
        hw.Attributor(gpt2, modules=["transformer.h.9.mlp"])
    with pytest.raises(ValueError, match=r"'transformer.wte' is a Embedding, which headwater cannot track"):
        hw.Attributor(gpt2, modules=["transformer.wte"])
    with pytest.raises(ValueError, match="modules='attention' is not understood"):
        hw.Attributor(gpt2, modules="attention")
    with pytest.raises(ValueError, match="found no MLP projections"):
        hw.Attributor(nn.Sequential(nn.Linear(2, 2)), modules="mlp")
    with pytest.raises(ValueError, match="has no supported layers"):
        hw.Attributor(nn.Sequential(nn.ReLU()))
    an = hw.Attributor(gpt2, modules="mlp")
    with pytest.raises(hw.NotFittedError, match="not fitted yet"):
        an.scores(lm_queries(1), lm_data(2))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        an.fit(lm_data(2), batch_size=0)
    an.fit(lm_data(4))
    with pytest.raises(ValueError, match="query_rank must be None or a positive integer"):
        an.scores(lm_queries(1), lm_data(2), query_rank=0)
    with pytest.raises(ValueError, match="damping must be None or a non-negative number"):
        an.scores(lm_queries(1), lm_data(2), damping=-1.0)


def test_bad_data_raises_clear_errors(gpt2):
    an = hw.Attributor(gpt2, modules="mlp")
    with pytest.raises(ValueError, match="training data is empty"):
        an.fit([])
    with pytest.raises(TypeError, match="training data must be a list"):
        an.fit("some text")
    with pytest.raises(ValueError, match=r"examples 0..1: example 1 has no 'input_ids' \(found \['ids'\]\)"):
        an.fit([{"input_ids": [1, 2, 3]}, {"ids": [1, 2]}])
    with pytest.raises(ValueError, match="got raw text but LanguageModelingTask has no tokenizer"):
        an.fit(["hello world"])
    masked = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, -100, -100]}]
    with pytest.raises(ValueError, match="training data example 2 has no scored tokens"):
        an.fit(lm_data(2) + masked)
    with pytest.raises(ValueError, match="example 0 has 1 token"):
        an.fit([{"input_ids": [5]}])
    an.fit(lm_data(4))
    with pytest.raises(ValueError, match="queries example 0 has no scored tokens"):
        an.scores(masked, lm_data(2))
    with pytest.raises(ValueError, match="a classification batch must be"):
        hw.Attributor(MLP(), task=hw.ClassificationTask(), strategy="identity").scores([{"x": 1}], [{"x": 1}])


def test_non_finite_factors_and_outputs_raise_instead_of_returning_nan():
    model = MLP().double()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(hw.NonFiniteError, match="gradient covariance S of layer 'fc1'"):
        hw.Attributor(model, task=hw.ClassificationTask(), fisher="empirical").fit(classification_data(8))
    with pytest.raises(hw.NonFiniteError, match="model's outputs contain NaN or inf"):
        hw.Attributor(model, task=hw.ClassificationTask()).fit(classification_data(8))
    with pytest.raises(hw.NonFiniteError, match="scores of layer 'fc1'"):
        hw.Attributor(model, task=hw.ClassificationTask(), strategy="identity").scores(
            classification_data(2), classification_data(3)
        )


def test_exact_fisher_needs_a_task_that_supports_it(gpt2):
    with pytest.raises(NotImplementedError, match="fisher='exact' needs LanguageModelingTask.gauss_newton_losses"):
        Attributor(gpt2, modules="mlp", fisher="exact").fit(lm_data(2))


def test_hf_datasets_and_torch_datasets_are_accepted(gpt2):
    from datasets import Dataset
    from torch.utils.data import TensorDataset

    rows = [{"input_ids": x["input_ids"].tolist()} for x in lm_data(6)]
    ds = Dataset.from_list(rows)
    an = hw.Attributor(gpt2, modules="mlp", fisher="empirical").fit(ds)
    ref = hw.Attributor(gpt2, modules="mlp", fisher="empirical").fit(rows)
    q = lm_queries(2)
    torch.testing.assert_close(an.scores(q, ds).values, ref.scores(q, rows).values)

    model = MLP().double()
    data = classification_data(10)
    tds = TensorDataset(torch.stack([x for x, _ in data]), torch.stack([y for _, y in data]))
    task = hw.ClassificationTask()
    a1 = hw.Attributor(model, task=task, fisher="empirical").fit(tds, batch_size=4).scores(data[:2], tds).values
    a2 = hw.Attributor(model, task=task, fisher="empirical").fit(data, batch_size=4).scores(data[:2], data).values
    torch.testing.assert_close(a1, a2)


def test_a_layer_tied_to_an_embedding_is_flagged():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)  # ties lm_head to the token embedding
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with \['transformer.wte'\]"):
        hw.Attributor(model, modules=None)
    with pytest.warns(UserWarning, match="lm_head"):
        hw.Attributor(model, modules=["lm_head"])


def test_a_long_prompt_is_cut_from_the_left_so_the_completion_is_scored_whole():
    from headwater.errors import ExampleError, TruncationWarning

    task = hw.LanguageModelingTask(max_length=8)
    ids = list(range(1, 13))  # 9 prompt tokens, 3 completion tokens
    item = {"input_ids": ids, "labels": [-100] * 9 + ids[9:]}
    with pytest.warns(TruncationWarning, match=r"queries: example 0: the prompt was truncated from the left by 4 of 9"):
        batch = next(hw.data.iter_batches([item], task, 1, "queries"))[1]
    assert batch["input_ids"][0].tolist() == ids[4:]  # the last 5 prompt tokens, then the completion
    assert (batch["labels"][0] != -100).sum() == 3
    text = {"input_ids": ids}  # a plain document keeps its first max_length tokens, silently
    assert next(hw.data.iter_batches([text], task, 1, "train"))[1]["input_ids"][0].tolist() == ids[:8]
    long = {"input_ids": ids, "labels": [-100] * 2 + ids[2:]}  # a 10-token completion cannot fit in 8
    with pytest.raises(ExampleError, match=r"queries, examples 0..1: example 1: its scored tokens .* span 10 tokens"):
        next(hw.data.iter_batches([item, long], task, 2, "queries"))
