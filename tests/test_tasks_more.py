"""Beyond causal LMs: sequence classification (BERT-style encoders) and seq2seq (T5, BART).

Losses are checked against the models' own Hugging Face loss, scores against autograd, and the
token masks against what each layer's token axis is (source or target).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwater as hw
from _families import ENCODERS, SEQ2SEQ, autograd_grads, build, cls_data, missing, seq2seq_data
from headwater.engine import Capture
from headwater.errors import ExampleError
from headwater.layers import select_layers
from headwater.task import Seq2SeqTask, SequenceClassificationTask, TokenMasks

_bert, _t5, _bart = ENCODERS[0], SEQ2SEQ[0], SEQ2SEQ[1]


def _model(family):
    if missing(family):
        pytest.skip(missing(family))
    return build(family)


class CharTokenizer:
    """[CLS]=2 + one id per character + [SEP]=1, as a BERT-style tokenizer returns them."""

    pad_token_id = 0

    def __call__(self, text=None, pair=None, text_target=None):
        ids = lambda s: [3 + ord(ch) % 50 for ch in s]  # noqa: E731
        if text_target is not None:
            return {"input_ids": ids(text_target) + [1]}
        first = [2] + ids(text) + [1]
        if pair is None:
            return {"input_ids": first}
        second = ids(pair) + [1]
        return {"input_ids": first + second, "token_type_ids": [0] * len(first) + [1] * len(second)}


# --------------------------------------------------------------------- sequence classification


def test_classification_collate_reads_text_pairs_and_ids():
    task = SequenceClassificationTask(tokenizer=CharTokenizer())
    batch = task.collate([{"text": "ab", "text_pair": "c", "label": 2}, {"text": "abcd", "text_pair": "", "label": 0}])
    a, b, c, d = 50, 51, 52, 3  # 3 + ord(ch) % 50
    assert batch["input_ids"].tolist() == [[2, a, b, 1, c, 1, 0], [2, a, b, c, d, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 7]
    assert batch["labels"].tolist() == [2, 0]
    ids = SequenceClassificationTask().collate(
        [{"input_ids": [5, 6, 7, 0], "attention_mask": [1, 1, 1, 0], "labels": 1}, {"input_ids": [8], "label": 0}]
    )
    assert ids["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and ids["attention_mask"].tolist()[1] == [1, 0, 0]
    assert "token_type_ids" not in ids


def test_classification_examples_without_what_they_need_are_errors():
    task = SequenceClassificationTask()
    with pytest.raises(ExampleError, match=r"example 1 has no 'label'"):
        task.collate([{"input_ids": [1], "label": 0}, {"input_ids": [2]}])
    with pytest.raises(ExampleError, match=r"example 0 has no 'input_ids' or 'text'"):
        task.collate([{"label": 0}])
    with pytest.raises(ValueError, match=r"raw text but SequenceClassificationTask has no tokenizer"):
        task.collate([{"text": "hi", "label": 0}])
    with pytest.raises(ValueError, match=r"logits of shape .* not \[N, classes >= 2\]"):
        task.loss(lambda **kw: torch.zeros(1, 1), task.collate([{"input_ids": [1], "label": 0}]))


@pytest.mark.parametrize("family", ENCODERS, ids=[f.name for f in ENCODERS])
def test_classification_loss_is_the_models_own_cross_entropy_summed(family):
    model, task = _model(family), SequenceClassificationTask()
    batch = task.collate(cls_data(3))
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(task.loss(model, batch), 3 * hf)


def test_classification_scores_are_exact_batch_invariant_and_fit_with_every_fisher():
    model, task = _model(_bert), SequenceClassificationTask()
    train, queries = cls_data(4), cls_data(2, seed=9)
    runs = [
        hw.Attributor(model, task=task, strategy="identity").scores(queries, train, batch_size=bs).values
        for bs in (1, 4)
    ]
    layers = select_layers(model, None)
    ref = autograd_grads(model, task, queries, layers, measurement=True) @ autograd_grads(model, task, train, layers).T
    for values in runs:
        torch.testing.assert_close(values, ref)
    for fisher in ("auto", "exact", "sampled"):
        an = hw.Attributor(model, task=task, fisher=fisher, modules="mlp").fit(train, batch_size=2)
        assert an.fisher == ("topk" if fisher == "auto" else fisher)
        assert torch.isfinite(an.scores(queries, train, batch_size=2).values).all()


def test_pooled_heads_count_once_per_sequence_on_the_first_token():
    model, task = _model(_bert), SequenceClassificationTask()
    batch = task.collate(cls_data(3))
    layers = select_layers(model, ["bert.encoder.layer.0.intermediate.dense", "bert.pooler.dense", "classifier"])
    with Capture(model, layers) as cap:
        caps = {c.name: c for c in cap.backward(task.loss(model, batch), task.token_mask(batch))}
    assert torch.equal(caps["bert.encoder.layer.0.intermediate.dense"].mask, batch["attention_mask"].bool())
    for name in ("bert.pooler.dense", "classifier"):
        c = caps[name]
        assert c.a.shape[1] == 1 and c.mask.all() and (c.positions == 0).all()
        folded = c.fold_tokens(torch.ones(1, 3, 1, dtype=torch.float64))
        assert folded.shape == (1, 3, batch["input_ids"].shape[1]) and folded[..., 1:].abs().sum() == 0


# ------------------------------------------------------------------------------------ seq2seq


def test_seq2seq_collate_keeps_the_two_token_axes_apart():
    task = Seq2SeqTask(pad_token_id=0)
    batch = task.collate([{"input_ids": [5, 6, 7], "labels": [8, 9, 10]}])
    assert batch["input_ids"].shape == (1, 3) and batch["target_ids"].shape == (1, 4)  # one padded position
    assert batch["labels"].tolist() == [[8, 9, 10, -100]] and batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0]]
    masks = task.token_mask(batch)
    assert isinstance(masks, TokenMasks) and masks.shape == (1, 4) and masks.any(dim=1).tolist() == [True]
    with pytest.raises(ValueError, match=r"token axes of lengths \[3, 3\].*pad one side"):
        TokenMasks((torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"masks for \[2, 1\] sequences"):
        TokenMasks((torch.ones(2, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)))
    pairs = [{"source": "ab", "target": "c"}, {"prompt": "a", "completion": "bc"}]
    text = Seq2SeqTask(tokenizer=CharTokenizer()).collate(pairs)
    assert text["input_ids"].tolist() == [[2, 50, 51, 1], [2, 50, 1, 0]]  # sources keep [CLS]/[SEP]
    assert text["target_ids"].tolist() == [[52, 1, 0], [51, 52, 1]] and text["labels"][0, 2] == -100
    with pytest.raises(ExampleError, match=r"example 0 has 'input_ids' but no 'labels'"):
        task.collate([{"input_ids": [1, 2]}])
    with pytest.raises(ExampleError, match=r"has no 'source' \+ 'target'"):
        task.collate([{"text": "x"}])


@pytest.mark.parametrize("family", SEQ2SEQ, ids=[f.name for f in SEQ2SEQ])
def test_seq2seq_loss_is_the_models_own_target_nll_summed(family):
    model, task = _model(family), Seq2SeqTask(pad_token_id=model_pad(family))
    batch = task.collate(seq2seq_data(3))
    labels = batch["labels"]
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(task.loss(model, batch), (labels != -100).sum() * hf)


def model_pad(family) -> int:
    return family.kwargs["pad_token_id"]


@pytest.mark.parametrize("family", SEQ2SEQ, ids=[f.name for f in SEQ2SEQ])
def test_seq2seq_scores_match_autograd(family):
    model, task = _model(family), Seq2SeqTask(pad_token_id=model_pad(family))
    train, queries = seq2seq_data(3), seq2seq_data(2, seed=11)
    an = hw.Attributor(model, task=task, strategy="identity")
    ref = autograd_grads(model, task, queries, an.layers, measurement=True)
    ref = ref @ autograd_grads(model, task, train, an.layers).T
    torch.testing.assert_close(an.scores(queries, train, batch_size=2).values, ref)
    ek = hw.Attributor(model, task=task, modules="mlp").fit(train, batch_size=2)
    assert torch.isfinite(ek.scores(queries, train, batch_size=2).values).all()


def test_encoder_layers_see_the_source_mask_and_decoder_layers_the_target_mask():
    model, task = _model(_t5), Seq2SeqTask()
    data = seq2seq_data(3)
    data[0] = {"input_ids": data[0]["input_ids"], "labels": torch.tensor([7, -100, 9])}  # an unscored target token
    batch = task.collate(data)
    names = [
        "encoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.1.EncDecAttention.q",
        "decoder.block.0.layer.1.EncDecAttention.k",  # runs on the encoder's output: the source axis
        "decoder.block.0.layer.2.DenseReluDense.wo",
    ]
    with Capture(model, select_layers(model, names)) as cap:
        caps = {c.name: c for c in cap.backward(task.loss(model, batch), task.token_mask(batch))}
    source, target = batch["attention_mask"].bool(), batch["labels"] != -100
    s_src, s_tgt = source.shape[1], target.shape[1]
    assert s_src != s_tgt and not target[0, 1]
    for name, mask, offset in zip(names, (source, target, target, source, target), (0, s_src, s_src, 0, s_src)):
        c = caps[name]
        assert torch.equal(c.mask, mask), name
        assert c.seq_len == s_src + s_tgt and torch.equal(c.positions[0], offset + torch.arange(mask.shape[1])), name


# ------------------------------------------------------------------------ misaligned layers


class _Odd(nn.Module):
    """Layers whose token axis is not the batch's: a window of 3 positions, rows of 2 sequences' worth."""

    def __init__(self):
        super().__init__()
        self.window = nn.Linear(4, 4)
        self.rows = nn.Linear(4, 4)

    def forward(self, x):
        return self.window(x[:, :3]).sum() + self.rows(x[:, :2].reshape(-1, 4)[:3]).sum()


def test_a_layer_whose_token_axis_matches_no_mask_is_an_error():
    model, x = _Odd().double(), torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with Capture(model, select_layers(model, ["window"])) as cap:
        with pytest.raises(ValueError, match=r"'window' has 3 positions per sequence.*5 tokens"):
            list(cap.backward(model(x), mask))
    with Capture(model, select_layers(model, ["rows"])) as cap:
        with pytest.raises(ValueError, match=r"'rows' ran on a tensor of shape \(3, 4\).*2 sequences"):
            list(cap.backward(model(x), mask))


def _folds_tokens() -> bool:
    import inspect

    from headwater.scoring import ScoreAccumulator

    return "fold_tokens" in inspect.getsource(ScoreAccumulator.update)


needs_fold = pytest.mark.skipif(
    not _folds_tokens(),
    reason="headwater.scoring.ScoreAccumulator does not fold per-token scores with LayerCapture.fold_tokens yet",
)


@needs_fold
def test_seq2seq_per_token_scores_lay_source_then_target_tokens():
    model, task = _model(_t5), Seq2SeqTask()
    train, queries = seq2seq_data(3), seq2seq_data(2, seed=11)
    batch = task.collate(train)
    s_src, s_tgt = batch["input_ids"].shape[1], batch["target_ids"].shape[1]
    full = hw.Attributor(model, task=task, strategy="identity").scores(queries, train, batch_size=3, per_token=True)
    assert full.per_token.shape == (2, 3, s_src + s_tgt)
    torch.testing.assert_close(full.per_token.sum(-1), full.values)
    encoder = [n for n in select_layers(model, None) if n.startswith("encoder.")]
    enc = hw.Attributor(model, task=task, strategy="identity", modules=encoder)
    tok = enc.scores(queries, train, batch_size=3, per_token=True).per_token
    assert (tok[..., s_src:] == 0).all() and (tok[..., :s_src] != 0).any()


@needs_fold
def test_a_pooled_head_scores_on_the_first_token():
    model, task = _model(_bert), SequenceClassificationTask()
    train, queries = cls_data(3), cls_data(2, seed=9)
    an = hw.Attributor(model, task=task, strategy="identity", modules=["classifier", "bert.pooler.dense"])
    res = an.scores(queries, train, batch_size=3, per_token=True)
    torch.testing.assert_close(res.per_token.sum(-1), res.values)
    assert (res.per_token[..., 1:] == 0).all() and (res.per_token[..., 0] != 0).all()


def test_task_arguments_and_batches_that_cannot_work_are_errors():
    with pytest.raises(ValueError, match=r"max_length must be at least 1 token, got 0"):
        SequenceClassificationTask(max_length=0)
    with pytest.raises(ValueError, match=r"max_target_length must be at least 1 token, got 0"):
        Seq2SeqTask(max_target_length=0)
    cls, s2s = SequenceClassificationTask(), Seq2SeqTask()
    with pytest.raises(ExampleError, match=r"example 0 is a list; a classification example is a dict"):
        cls.collate([[1, 2]])
    with pytest.raises(ExampleError, match=r"example 0 has no tokens"):
        cls.collate([{"input_ids": [], "label": 0}])
    with pytest.raises(ValueError, match=r"sequence-classification batch needs 'input_ids' and 'labels'"):
        cls.loss(nn.Identity(), {"input_ids": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"needs an 'attention_mask'"):
        cls.token_mask({"input_ids": torch.zeros(1, 2)})
    with pytest.raises(ExampleError, match=r"example 0 is a str; a seq2seq example is a dict"):
        s2s.collate(["text"])
    with pytest.raises(ExampleError, match=r"example 0 has an empty target"):
        s2s.collate([{"input_ids": [1], "labels": []}])
    with pytest.raises(ValueError, match=r"seq2seq batch needs \['input_ids', 'attention_mask', 'target_ids'"):
        s2s.token_mask({"input_ids": torch.zeros(1, 2)})
    batch = s2s.collate([{"input_ids": [1, 2], "labels": [3]}])
    with pytest.raises(ValueError, match=r"Identity.config has no decoder_start_token_id"):
        s2s.loss(nn.Identity(), batch)
    with pytest.raises(ValueError, match=r"TokenMasks needs one or more \[N, S\] bool masks"):
        TokenMasks([torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"scored=2 is not one of the 1 axes"):
        TokenMasks([torch.ones(1, 3, dtype=torch.bool)], scored=2)


def test_long_inputs_are_cut_with_a_warning():
    task = Seq2SeqTask(max_length=2, max_target_length=1)
    with pytest.warns(hw.errors.TruncationWarning, match=r"example 0: its source was truncated from 3 to max length 2"):
        batch = task.collate([{"input_ids": [4, 5, 6], "labels": [7, 8]}])
    assert batch["input_ids"].tolist() == [[4, 5]] and batch["labels"].tolist() == [[7]]
