"""Tasks: what the loss, the query measurement and the scored tokens are.

A task is the contract between a user's model and the engine. It turns raw examples into a
batch (``collate``), and defines three scalar functions of (model, batch), each **summed**
over examples and scored tokens:

- ``loss(model, batch, sample=False)``: the training loss L. With ``sample=True`` the labels
  are drawn from the model's own predictive distribution; the gradients of that pseudo-loss
  are the pseudo-gradients whose second moments estimate the Gauss-Newton matrix G.
- ``measurement(model, batch)``: the query function f. Built-in tasks use the loss itself,
  so for a language model f is the completion's summed NLL and a positive score means that
  upweighting a training sequence raises the completion's log-probability.
- ``sampled_losses(model, batch, samples)``: k = ``samples`` pseudo-losses from k independent
  label draws, each scaled by 1/sqrt(k) so that their gradients' outer products *average* over
  the draws (``fisher="sampled"``). The default calls ``loss(sample=True)`` k times; the
  built-in tasks override it to draw all k labels from one forward pass.
- ``scored_outputs(model, batch)`` (optional, with a ``likelihood``): the outputs at the scored
  positions. The Fisher estimators of ``headwater.fisher`` work from them: "topk" (the default
  for the built-in tasks), "importance" and "exact". A custom task without it can use
  "sampled" (through ``loss(sample=True)``) and "empirical".

``token_mask(batch)`` marks the tokens whose outputs are scored ([N, S] bool); K-FAC's
covariances count only those. Gradients always sum over every position, which is exact:
padding gets zero gradient by construction.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from .errors import ExampleError, NonFiniteError, TruncationWarning, all_finite

__all__ = [
    "Task",
    "LanguageModelingTask",
    "ClassificationTask",
    "RegressionTask",
    "SequenceClassificationTask",
    "Seq2SeqTask",
    "TokenMasks",
    "IGNORE",
    "model_logits",
    "sample_categorical",
    "label_losses",
    "inverse_cdf",
    "wide",
    "overrides_loss",
]

IGNORE = -100  # the HF convention for "not scored"


class Task:
    """Base class. Subclass and implement ``loss`` and ``measurement``.

    ``collate`` defaults to ``torch.utils.data.default_collate``; override it when examples
    need tokenizing or padding. ``token_mask`` defaults to None (every token counts).
    """

    def collate(self, items: list[Any]) -> Any:
        return default_collate(items)

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(model, batch, sample)")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement measurement(model, batch)")

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        return None

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` pseudo-losses with independently drawn labels, each scaled by 1/sqrt(k).

        This default runs the model once per draw. That is still exact: the capture concatenates
        a layer's repeated calls along the token axis, so each pseudo-gradient is that draw's.
        But each backward then visits all k recorded calls, so the cost grows as k^2: override
        it to draw all labels from one forward pass, as the built-in tasks do.
        """
        return [self.loss(model, batch, sample=True) * samples**-0.5 for _ in range(samples)]  # x 1.0 is exact

    # Optional: a task whose outputs have a known likelihood exposes them, and headwater's
    # Fisher estimators (``headwater.fisher``: topk, importance, exact) work from them.
    likelihood: str | None = None  # "categorical" (softmax cross-entropy) or "gaussian" (squared error)
    exact_fisher = False  # whether one backward pass per output (fisher="exact") is affordable

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's outputs at the scored positions, [M, C] (logits, or predictions for squared error).

        ``loss(sample=False)`` must be the ``likelihood``'s negative log-likelihood of these
        outputs, summed. Optional: without it, ``fisher`` can be "sampled" or "empirical", or a
        task may implement the estimator hooks below itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement scored_outputs()")

    # Optional hooks that replace headwater's estimators for a custom task (rarely needed):
    #   topk_losses(model, batch, samples, top), importance_losses(model, batch, samples),
    #   gauss_newton_losses(model, batch) (pseudo-losses whose gradients' outer products sum to G).

    def fingerprint(self) -> str:
        """A hash of what the task's batches and losses depend on besides the data.

        The class and every instance attribute: numbers and strings as they are, a tokenizer by
        its full serialization (vocabulary, merges, normalization), anything else by its type.
        Part of every cache key, so a result is never reused across tokenizers or max_length.
        """
        parts: dict[str, Any] = {"class": f"{type(self).__module__}.{type(self).__qualname__}"}
        for key, value in sorted(vars(self).items()):
            parts[key] = value if isinstance(value, (str, int, float, bool, type(None))) else _digest(value)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move every tensor in a (nested) batch to ``device``."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, Mapping):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v, device) for v in batch)
        return batch


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go to float32 for the loss; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def model_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def sample_categorical(logits: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    """Labels drawn from softmax(logits) [..., C], from torch's global RNG (seeded per batch).

    Returns [...], or [..., samples] independent draws when ``samples`` is given (one uniform
    tensor either way, so ``samples=1`` draws exactly what ``samples=None`` does).
    """
    if not all_finite(logits):
        raise NonFiniteError(
            "the model's outputs contain NaN or inf, so no labels can be sampled from them; "
            "check the weights and inputs, or run in float32"
        )
    drawn = inverse_cdf(torch.softmax(logits.float(), dim=-1), 1 if samples is None else samples)
    return drawn.squeeze(-1) if samples is None else drawn


def inverse_cdf(p: torch.Tensor, samples: int) -> torch.Tensor:
    """[..., samples] draws from the (unnormalized) weights p [..., C].

    Inverse-CDF sampling (cumsum + searchsorted) is several times faster than
    ``torch.multinomial`` for LM vocabularies.
    """
    cdf = p.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (samples,), device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).clamp_(max=p.shape[-1] - 1)


def label_losses(log_probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | float) -> list[torch.Tensor]:
    """Pseudo-losses ``-sum_t w_tj log p_t(y_tj)``, j = 1..J, from log_probs [M, C], labels [M, J].

    Each one's logit gradient is ``w_tj (p_t - e_{y_tj})``. All J share one log-softmax, so the
    graph holds a single [M, C] tensor rather than one per draw (J cross-entropies would keep J).
    """
    w = torch.as_tensor(weights, dtype=log_probs.dtype, device=log_probs.device).expand(labels.shape)
    return [-(log_probs.gather(-1, labels[:, j : j + 1]).squeeze(-1) * w[:, j]).sum() for j in range(labels.shape[1])]


class LanguageModelingTask(Task):
    """Causal language modelling with a HF-style model (``model(input_ids, attention_mask)``).

    Examples may be dicts with ``input_ids`` (and optional ``labels``, ``attention_mask``),
    or, when a tokenizer is given, strings, ``{"text": ...}`` or ``{"prompt", "completion"}``
    (only the completion is scored). Labels use -100 for tokens that are not scored; the model
    predicts ``labels[t + 1]`` from position ``t``.
    """

    likelihood = "categorical"

    def __init__(self, tokenizer: Any = None, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    # ---- collation -------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                "got raw text but LanguageModelingTask has no tokenizer; "
                "pass LanguageModelingTask(tokenizer=...) or pre-tokenized 'input_ids'"
            )
        enc = self.tokenizer(text, add_special_tokens=False)
        ids = enc["input_ids"] if isinstance(enc, Mapping) else enc.ids
        return list(ids)

    def _example(self, item: Any, i: int) -> tuple[list[int], list[int]]:
        if isinstance(item, str):
            ids = self._encode(item)
            labels = list(ids)
        elif isinstance(item, Mapping) and "input_ids" in item:
            ids = _as_list(item["input_ids"])
            if "attention_mask" in item:  # drop padding that came with the example
                keep = _as_list(item["attention_mask"])
                ids = [t for t, m in zip(ids, keep) if m]
            labels = _as_list(item["labels"]) if item.get("labels") is not None else list(ids)
            if len(labels) < len(ids):
                raise ExampleError(i, ": 'labels' is shorter than 'input_ids'")
            labels = labels[: len(ids)]
        elif isinstance(item, Mapping) and "prompt" in item and "completion" in item:
            p, c = self._encode(item["prompt"]), self._encode(item["completion"])
            ids = p + c
            labels = [IGNORE] * len(p) + c
        elif isinstance(item, Mapping) and "text" in item:
            ids = self._encode(item["text"])
            labels = list(ids)
        else:
            keys = list(item.keys()) if isinstance(item, Mapping) else type(item).__name__
            raise ExampleError(
                i,
                f" has no 'input_ids' (found {keys}); a language-modelling example "
                "needs 'input_ids', or with a tokenizer 'text' or 'prompt' + 'completion'",
            )
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = self._truncate(ids, labels, i)
        if len(ids) < 2:
            raise ExampleError(i, f" has {len(ids)} token(s); at least 2 are needed")
        return ids, labels

    def _truncate(self, ids: list[int], labels: list[int], i: int) -> tuple[list[int], list[int]]:
        """Cut a sequence to ``max_length`` tokens without losing a scored token.

        A document scored from its first token (plain text) keeps its first ``max_length``
        tokens. A sequence with an unscored prefix (a prompt) keeps its scored tokens and drops
        prompt tokens *from the left*: the window ends at the last scored token, and at least one
        position before the first scored token stays, since that position predicts it. Cutting from
        the right instead once scored 4 of a 19-token completion without a word. If the scored
        span alone does not fit, the example is refused.
        """
        m = self.max_length
        scored = [t for t, lab in enumerate(labels) if lab != IGNORE]
        if not scored or scored[0] == 0:
            return ids[:m], labels[:m]
        start = max(0, scored[-1] + 1 - m)
        if start > scored[0] - 1:
            span = scored[-1] - scored[0] + 1
            raise ExampleError(
                i,
                f": its scored tokens (the completion) span {span} tokens, but max_length={m} holds at most "
                f"{m - 1} after one prompt token; shorten the completion or raise max_length",
            )
        end = start + m
        if start > 0:
            warnings.warn(
                TruncationWarning(
                    i,
                    f": the prompt was truncated from the left by {start} of {scored[0]} tokens so that the "
                    f"{len(scored)} scored tokens fit max_length={m}",
                ),
                stacklevel=2,
            )
        return ids[start:end], labels[start:end]

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example; padding gets attention 0 and label -100."""
        pairs = [self._example(item, i) for i, item in enumerate(items)]
        s = max(len(ids) for ids, _ in pairs)
        n = len(pairs)
        input_ids = torch.zeros(n, s, dtype=torch.long)
        attention = torch.zeros(n, s, dtype=torch.long)
        labels = torch.full((n, s), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    # ---- model functions -------------------------------------------------------------
    def _check(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            found = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a language-modelling batch needs 'input_ids' and 'labels' (found {found})")

    def _forward(self, model: nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for positions 0..S-2 and their targets labels[1..S-1]."""
        self._check(batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = model_logits(out)[:, :-1]
        return logits, batch["labels"][:, 1:]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits, targets = self._forward(model, batch)
        scored = targets != IGNORE
        if sample:
            with torch.no_grad():
                drawn = sample_categorical(logits[scored])
            targets = targets.clone()
            targets[scored] = drawn
        return F.cross_entropy(
            wide(logits.reshape(-1, logits.shape[-1])),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per scored token from one forward pass (see ``Task``)."""
        if overrides_loss(self, LanguageModelingTask):
            return super().sampled_losses(model, batch, samples)
        logits, targets = self._forward(model, batch)
        logits = logits[targets != IGNORE]  # [M, V]
        with torch.no_grad():
            drawn = sample_categorical(logits, samples)  # [M, k]
        return label_losses(F.log_softmax(wide(logits), dim=-1), drawn, samples**-0.5)

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits of the scored positions, [M, V]."""
        logits, targets = self._forward(model, batch)
        return logits[targets != IGNORE]

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def token_mask(self, batch: Any) -> torch.Tensor:
        """Position t is scored when it predicts a label: labels[t + 1] != -100."""
        self._check(batch)
        labels = batch["labels"]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE
        return mask


class ClassificationTask(Task):
    """Batches ``(inputs, targets)``; the model returns logits [N, C]; cross-entropy summed."""

    likelihood = "categorical"
    exact_fisher = True  # one backward pass per class

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"a classification batch must be (inputs, targets), got {type(batch).__name__}")
        return batch[0], batch[1]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        inputs, targets = self._split(batch)
        logits = model_logits(model(inputs))
        if sample:
            with torch.no_grad():
                targets = sample_categorical(logits)
        return F.cross_entropy(wide(logits), targets, reduction="sum")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per example from one forward pass (see ``Task``)."""
        if overrides_loss(self, ClassificationTask):
            return super().sampled_losses(model, batch, samples)
        inputs, _ = self._split(batch)
        logits = model_logits(model(inputs))
        with torch.no_grad():
            drawn = sample_categorical(logits, samples)  # [N, k]
        return label_losses(F.log_softmax(wide(logits), dim=-1), drawn, samples**-0.5)

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits [N, C]."""
        inputs, _ = self._split(batch)
        return model_logits(model(inputs))


class RegressionTask(Task):
    """Batches ``(inputs, targets)``; loss ``sum ||model(x) - y||^2 / 2``.

    The Gauss-Newton output Hessian is the identity, so sampled pseudo-targets are
    ``y ~ N(model(x), I)`` and the exact pseudo-losses are the output coordinates.
    """

    likelihood = "gaussian"
    exact_fisher = True  # one backward pass per output coordinate

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"a regression batch must be (inputs, targets), got {type(batch).__name__}")
        return batch[0], batch[1]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        inputs, targets = self._split(batch)
        pred = model_logits(model(inputs))
        targets = targets.reshape(pred.shape).to(pred.dtype)
        if sample:
            with torch.no_grad():
                targets = pred + torch.randn_like(pred)
        return 0.5 * ((pred - targets) ** 2).sum()

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` pseudo-target draws per example from one forward pass (see ``Task``)."""
        if overrides_loss(self, RegressionTask):
            return super().sampled_losses(model, batch, samples)
        inputs, _ = self._split(batch)
        pred = model_logits(model(inputs))
        with torch.no_grad():
            targets = pred + torch.randn((samples, *pred.shape), dtype=pred.dtype, device=pred.device)
        return [0.5 * ((pred - t) ** 2).sum() * samples**-0.5 for t in targets]  # x 1.0 is exact for k = 1

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Predictions [N, D] (the Gauss-Newton output Hessian of squared error is the identity)."""
        inputs, _ = self._split(batch)
        return model_logits(model(inputs))


def overrides_loss(task: Task, builtin: type) -> bool:
    """Whether a subclass replaced the built-in ``loss``: then its own loss must draw the labels."""
    return type(task).loss is not builtin.loss


def _digest(obj: Any) -> str:
    """Content hash of a tokenizer (or a tensor); other objects count by their type only."""
    h = hashlib.sha256(f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):  # HF fast tokenizers: the whole tokenizer.json
        h.update(backend.to_str().encode())
    elif hasattr(obj, "to_str"):  # a tokenizers.Tokenizer
        h.update(obj.to_str().encode())
    elif hasattr(obj, "get_vocab"):  # slow tokenizers: vocabulary and special tokens
        h.update(json.dumps(sorted(obj.get_vocab().items()), default=str).encode())
        h.update(repr(getattr(obj, "special_tokens_map", None)).encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)


# ---------------------------------------------------------------------------------------------
# Models beyond causal LMs: encoder classifiers and encoder-decoders.


class TokenMasks:
    """The token masks of a batch whose model has several token axes (an encoder-decoder).

    ``axes``: one bool mask [N, S_k] per axis, in the order per-token scores lay their tokens out
    (for ``Seq2SeqTask``: source, then target). ``scored``: the axis whose tokens the loss scores;
    the engine refuses an example without any of them. The capture gives each layer call the mask
    of the axis whose length its token axis has (encoder layers and cross-attention keys/values
    see the source, the rest of the decoder the target), so the lengths must differ: a task pads
    one side by a position when they would not (``Seq2SeqTask.collate`` does).

    It answers ``any(dim)`` and ``shape`` for its scored axis, as a plain mask would.
    """

    def __init__(self, axes: Sequence[torch.Tensor], scored: int = -1):
        axes = tuple(axes)
        if not axes or any(not isinstance(m, torch.Tensor) or m.dim() != 2 for m in axes):
            raise ValueError("TokenMasks needs one or more [N, S] bool masks")
        n, lengths = axes[0].shape[0], [m.shape[1] for m in axes]
        if any(m.shape[0] != n for m in axes):
            raise ValueError(f"TokenMasks got masks for {[m.shape[0] for m in axes]} sequences; they must agree")
        if len(set(lengths)) != len(lengths):
            raise ValueError(
                f"TokenMasks got token axes of lengths {lengths}: the capture tells a layer's axis by its length, so "
                "they must differ; pad one side of the batch by a position (attention 0, label -100)"
            )
        if not -len(axes) <= scored < len(axes):
            raise ValueError(f"scored={scored} is not one of the {len(axes)} axes")
        self.axes = tuple(m.bool() for m in axes)
        self.scored = scored % len(axes)

    @property
    def shape(self) -> torch.Size:
        return self.axes[self.scored].shape

    def any(self, dim: int = 1, keepdim: bool = False) -> torch.Tensor:
        """Which sequences have a scored token (over the scored axis), as ``Tensor.any``."""
        return self.axes[self.scored].any(dim=dim, keepdim=keepdim)

    def __repr__(self) -> str:
        return f"TokenMasks(lengths={[m.shape[1] for m in self.axes]}, scored={self.scored})"


def _tokenize(tokenizer: Any, text: str, task: str, pair: str | None = None, target: bool = False) -> list[int]:
    """Token ids with the model's special tokens ([CLS]/[SEP], </s>): encoders and seq2seq need them."""
    if tokenizer is None:
        raise ValueError(f"got raw text but {task} has no tokenizer; pass {task}(tokenizer=...) or pre-tokenized ids")
    if target:
        try:
            enc = tokenizer(text_target=text)
        except TypeError:  # a tokenizer without text_target: targets are encoded as any text
            enc = tokenizer(text)
    else:
        enc = tokenizer(text, pair) if pair is not None else tokenizer(text)
    ids = enc["input_ids"] if isinstance(enc, Mapping) else enc.ids
    return list(ids)


def _pad_id(tokenizer: Any, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _cut(ids: list[int], limit: int | None, i: int, what: str) -> list[int]:
    if limit is None or len(ids) <= limit:
        return ids
    warnings.warn(
        TruncationWarning(i, f": its {what} was truncated from {len(ids)} to max length {limit} tokens"), stacklevel=3
    )
    return ids[:limit]


def _right_pad(rows: list[list[int]], length: int, fill: int) -> torch.Tensor:
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class SequenceClassificationTask(Task):
    """Sequence classification with a HF ``AutoModelForSequenceClassification`` (BERT, RoBERTa, DistilBERT, ...).

    Examples: ``{"text": ..., "label": int}`` (``"text_pair"`` for sentence pairs) with a
    tokenizer, or pre-tokenized ``{"input_ids", "attention_mask"?, "token_type_ids"?, "label"}``
    (``"labels"`` also accepted). Loss and measurement: the cross-entropy of the given label,
    summed over examples, so a positive score means upweighting the training example raises the
    query's log-probability of its label. ``token_mask`` marks the real (non-padding) tokens:
    every encoder position feeds the prediction, so all of them enter the covariances; a pooled
    head (BERT's pooler, the classifier) counts once per sequence.
    """

    likelihood = "categorical"
    exact_fisher = True  # one backward pass per class

    def __init__(self, tokenizer: Any = None, max_length: int | None = None, pad_token_id: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 token, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = _pad_id(tokenizer, pad_token_id)

    def _example(self, item: Any, i: int) -> tuple[list[int], list[int] | None, int]:
        if not isinstance(item, Mapping):
            raise ExampleError(i, f" is a {type(item).__name__}; a classification example is a dict with a 'label'")
        label = item.get("label", item.get("labels"))
        if label is None:
            raise ExampleError(i, f" has no 'label' (found {list(item.keys())}); give each example its class index")
        label = int(label.item() if isinstance(label, torch.Tensor) else label)
        types = None
        if "input_ids" in item:
            ids = _as_list(item["input_ids"])
            keep = _as_list(item["attention_mask"]) if "attention_mask" in item else [1] * len(ids)
            if "token_type_ids" in item:
                types = [t for t, m in zip(_as_list(item["token_type_ids"]), keep) if m]
            ids = [t for t, m in zip(ids, keep) if m]  # drop padding that came with the example
        elif "text" in item:
            name = type(self).__name__
            ids = _tokenize(self.tokenizer, item["text"], name, item.get("text_pair"))
            if item.get("text_pair") is not None:
                enc = self.tokenizer(item["text"], item["text_pair"])
                types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        else:
            raise ExampleError(
                i, f" has no 'input_ids' or 'text' (found {list(item.keys())}); a classification example needs one"
            )
        if not ids:
            raise ExampleError(i, " has no tokens")
        ids = _cut(ids, self.max_length, i, "text")
        return ids, None if types is None else types[: len(ids)], label

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example; padding gets attention 0."""
        rows = [self._example(item, i) for i, item in enumerate(items)]
        s = max(len(ids) for ids, _, _ in rows)
        batch = {
            "input_ids": _right_pad([ids for ids, _, _ in rows], s, self.pad_token_id),
            "attention_mask": _right_pad([[1] * len(ids) for ids, _, _ in rows], s, 0),
            "labels": torch.tensor([label for _, _, label in rows], dtype=torch.long),
        }
        if all(types is not None for _, types, _ in rows):
            batch["token_type_ids"] = _right_pad([types for _, types, _ in rows], s, 0)
        return batch

    def _logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            found = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a sequence-classification batch needs 'input_ids' and 'labels' (found {found})")
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model_logits(model(**kwargs))
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)}, not [N, classes >= 2]; "
                "SequenceClassificationTask needs a classifier (num_labels >= 2)"
            )
        return logits

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits = self._logits(model, batch)
        labels = batch["labels"]
        if sample:
            with torch.no_grad():
                labels = sample_categorical(logits)
        return F.cross_entropy(wide(logits), labels, reduction="sum")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per example from one forward pass (see ``Task``)."""
        if overrides_loss(self, SequenceClassificationTask):
            return super().sampled_losses(model, batch, samples)
        logits = self._logits(model, batch)
        with torch.no_grad():
            drawn = sample_categorical(logits, samples)  # [N, k]
        return label_losses(F.log_softmax(wide(logits), dim=-1), drawn, samples**-0.5)

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits [N, C]."""
        return self._logits(model, batch)

    def token_mask(self, batch: Any) -> torch.Tensor:
        """The real tokens: every one of them feeds the prediction."""
        if not isinstance(batch, Mapping) or "attention_mask" not in batch:
            raise ValueError("a sequence-classification batch needs an 'attention_mask' (collate makes one)")
        return batch["attention_mask"].bool()


class Seq2SeqTask(Task):
    """Sequence-to-sequence language modelling with a HF ``AutoModelForSeq2SeqLM`` (T5, BART, ...).

    Examples: ``{"source", "target"}`` (or ``{"prompt", "completion"}``) with a tokenizer, or
    pre-tokenized ``{"input_ids", "labels", "attention_mask"?}`` with ``labels`` the target ids
    (-100 for target tokens that are not scored). The decoder is teacher-forced: its input is
    ``[decoder_start] + target[:-1]`` and position t predicts ``labels[t]``. Loss and measurement:
    the target's summed NLL, so a positive score means upweighting the training pair raises the
    query target's log-probability.

    ``token_mask`` is ``TokenMasks((source tokens, scored target positions), scored=1)``: encoder
    layers (and cross-attention keys/values) run on the source, whose real tokens all feed the
    prediction; decoder layers run on the target, scored where ``labels != -100``. Per-token
    scores lay the source tokens first, then the target's. Since the capture tells the two axes
    apart by length, ``collate`` pads the target by one position when both would be equally long.
    """

    likelihood = "categorical"

    def __init__(
        self,
        tokenizer: Any = None,
        max_length: int | None = None,
        max_target_length: int | None = None,
        pad_token_id: int | None = None,
    ):
        for name, value in (("max_length", max_length), ("max_target_length", max_target_length)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 token, got {value}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.pad_token_id = _pad_id(tokenizer, pad_token_id)

    def _example(self, item: Any, i: int) -> tuple[list[int], list[int], list[int]]:
        """(source ids, target ids, labels) of one example."""
        if not isinstance(item, Mapping):
            raise ExampleError(i, f" is a {type(item).__name__}; a seq2seq example is a dict")
        name = type(self).__name__
        if "input_ids" in item:
            if item.get("labels") is None:
                raise ExampleError(
                    i, f" has 'input_ids' but no 'labels' (found {list(item.keys())}): give the target ids"
                )
            src = _as_list(item["input_ids"])
            if "attention_mask" in item:
                src = [t for t, m in zip(src, _as_list(item["attention_mask"])) if m]
            labels = _as_list(item["labels"])
            target = [t if t != IGNORE else self.pad_token_id for t in labels]
        else:
            source = item.get("source", item.get("prompt"))
            text = item.get("target", item.get("completion"))
            if source is None or text is None:
                raise ExampleError(
                    i,
                    f" has no 'source' + 'target' (or 'prompt' + 'completion', or 'input_ids' + 'labels'); found "
                    f"{list(item.keys())}",
                )
            src = _tokenize(self.tokenizer, source, name)
            target = _tokenize(self.tokenizer, text, name, target=True)
            labels = list(target)
        if not src or not target:
            raise ExampleError(i, f" has an empty {'source' if not src else 'target'}")
        src = _cut(src, self.max_length, i, "source")
        target = _cut(target, self.max_target_length, i, "target")
        return src, target, labels[: len(target)]

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Right-pad sources and targets; the target one position longer if both would be equally long."""
        rows = [self._example(item, i) for i, item in enumerate(items)]
        s_src = max(len(src) for src, _, _ in rows)
        s_tgt = max(len(tgt) for _, tgt, _ in rows)
        s_tgt += int(s_tgt == s_src)  # TokenMasks tells the axes apart by length
        return {
            "input_ids": _right_pad([src for src, _, _ in rows], s_src, self.pad_token_id),
            "attention_mask": _right_pad([[1] * len(src) for src, _, _ in rows], s_src, 0),
            "target_ids": _right_pad([tgt for _, tgt, _ in rows], s_tgt, self.pad_token_id),
            "decoder_attention_mask": _right_pad([[1] * len(tgt) for _, tgt, _ in rows], s_tgt, 0),
            "labels": _right_pad([lab for _, _, lab in rows], s_tgt, IGNORE),
        }

    def _check(self, batch: Any) -> None:
        need = ("input_ids", "attention_mask", "target_ids", "labels")
        if not isinstance(batch, Mapping) or any(k not in batch for k in need):
            found = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"a seq2seq batch needs {list(need)} (found {found}); build it with Seq2SeqTask.collate")

    def _forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits [N, S_tgt, V] and their labels [N, S_tgt]."""
        self._check(batch)
        config = getattr(model, "config", None)
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError(
                f"{type(model).__name__}.config has no decoder_start_token_id, so the decoder's first input is "
                "unknown; set model.config.decoder_start_token_id"
            )
        target = batch["target_ids"]
        decoder_input_ids = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], dim=1)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=batch.get("decoder_attention_mask"),
        )
        return model_logits(out), batch["labels"]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits, labels = self._forward(model, batch)
        scored = labels != IGNORE
        if sample:
            with torch.no_grad():
                drawn = sample_categorical(logits[scored])
            labels = labels.clone()
            labels[scored] = drawn
        return F.cross_entropy(
            wide(logits.reshape(-1, logits.shape[-1])), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per scored target token from one forward pass (see ``Task``)."""
        if overrides_loss(self, Seq2SeqTask):
            return super().sampled_losses(model, batch, samples)
        logits, labels = self._forward(model, batch)
        logits = logits[labels != IGNORE]  # [M, V]
        with torch.no_grad():
            drawn = sample_categorical(logits, samples)  # [M, k]
        return label_losses(F.log_softmax(wide(logits), dim=-1), drawn, samples**-0.5)

    def scored_outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Decoder logits at the scored target positions, [M, V]."""
        logits, labels = self._forward(model, batch)
        return logits[labels != IGNORE]

    def token_mask(self, batch: Any) -> TokenMasks:
        """Source tokens for the encoder's axis, scored target positions for the decoder's."""
        self._check(batch)
        return TokenMasks((batch["attention_mask"].bool(), batch["labels"] != IGNORE), scored=1)
