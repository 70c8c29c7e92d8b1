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
