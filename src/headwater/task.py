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
- ``topk_losses(model, batch, samples, top)`` (optional): ``fisher="topk"``, the
  variance-reduced estimator for peaked softmax outputs (see ``_topk_tail``): ``samples``
  pseudo-losses, each one backward pass, each holding the ``top`` likeliest labels exactly plus
  one tail draw under random signs. The built-in tasks implement it, and it is their default.
- ``importance_losses(model, batch, samples)`` (optional): ``fisher="importance"``, labels
  drawn in proportion to their share of tr(H) and reweighted (see ``_importance_labels``).
- ``gauss_newton_losses(model, batch)`` (optional): pseudo-losses whose gradients' outer
  products sum *exactly* to G, for ``fisher="exact"``. For a softmax with probabilities p,
  ``H = diag(p) - p p^T = sum_k sqrt(p_k)(e_k - p) (sqrt(p_k)(e_k - p))^T``, so one pseudo-loss
  per class with output gradient ``sqrt(p_k)(e_k - p)``; for squared error H = I and the
  pseudo-losses are the outputs themselves. We chose this square-root factorization over
  importance weights because it reproduces G to float precision with C backward passes.

``token_mask(batch)`` marks the tokens whose outputs are scored ([N, S] bool); K-FAC's
covariances count only those. Gradients always sum over every position, which is exact:
padding gets zero gradient by construction.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from .errors import ExampleError, NonFiniteError, TruncationWarning, all_finite

__all__ = ["Task", "LanguageModelingTask", "ClassificationTask", "RegressionTask"]

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

    def topk_losses(self, model: nn.Module, batch: Any, samples: int, top: int) -> list[torch.Tensor]:
        raise NotImplementedError(
            f"fisher='topk' needs {type(self).__name__}.topk_losses(); use fisher='sampled' or implement it"
        )

    def importance_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        raise NotImplementedError(
            f"fisher='importance' needs {type(self).__name__}.importance_losses(); use fisher='sampled' or implement it"
        )

    def gauss_newton_losses(self, model: nn.Module, batch: Any) -> Iterator[torch.Tensor]:
        raise NotImplementedError(
            f"fisher='exact' needs {type(self).__name__}.gauss_newton_losses(); use fisher='sampled' or implement it"
        )

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move every tensor in a (nested) batch to ``device``."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, Mapping):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v, device) for v in batch)
        return batch


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go to float32 for the loss; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _sample_categorical(logits: torch.Tensor, samples: int | None = None) -> torch.Tensor:
    """Labels drawn from softmax(logits) [..., C], from torch's global RNG (seeded per batch).

    Returns [...], or [..., samples] independent draws when ``samples`` is given (one uniform
    tensor either way, so ``samples=1`` draws exactly what ``samples=None`` does).
    """
    if not all_finite(logits):
        raise NonFiniteError(
            "the model's outputs contain NaN or inf, so no labels can be sampled from them; "
            "check the weights and inputs, or run in float32"
        )
    drawn = _inverse_cdf(torch.softmax(logits.float(), dim=-1), 1 if samples is None else samples)
    return drawn.squeeze(-1) if samples is None else drawn


def _inverse_cdf(p: torch.Tensor, samples: int) -> torch.Tensor:
    """[..., samples] draws from the (unnormalized) weights p [..., C].

    Inverse-CDF sampling (cumsum + searchsorted) is several times faster than
    ``torch.multinomial`` for LM vocabularies.
    """
    cdf = p.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (samples,), device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).clamp_(max=p.shape[-1] - 1)


def _label_losses(log_probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | float) -> list[torch.Tensor]:
    """Pseudo-losses ``-sum_t w_tj log p_t(y_tj)``, j = 1..J, from log_probs [M, C], labels [M, J].

    Each one's logit gradient is ``w_tj (p_t - e_{y_tj})``. All J share one log-softmax, so the
    graph holds a single [M, C] tensor rather than one per draw (J cross-entropies would keep J).
    """
    w = torch.as_tensor(weights, dtype=log_probs.dtype, device=log_probs.device).expand(labels.shape)
    return [-(log_probs.gather(-1, labels[:, j : j + 1]).squeeze(-1) * w[:, j]).sum() for j in range(labels.shape[1])]


def _rademacher(like: torch.Tensor) -> torch.Tensor:
    """Independent +-1 signs shaped like ``like``, from torch's global RNG (seeded per batch)."""
    return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1


def _topk_tail(p: torch.Tensor, top: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and signed weights [k, M, J] of the top-m-plus-tail estimator of H = diag(p) - p p^T.

    With v_c = e_c - p, ``H = sum_c p_c v_c v_c^T``. For a peaked p almost all of that mass is
    in a few classes, and plain sampling spends its draws re-drawing them while the rare draw
    of a tail class, whose v_c is large, decides the estimate. Here the top m = ``top``
    classes enter exactly (weight sqrt(p_c)), and one label y drawn from the renormalized tail
    enters with weight sqrt(r), r = the tail mass: ``sum_top p_c v_c v_c^T + r v_y v_y^T`` is
    unbiased for H, and the tail's share r enters every time instead of by luck of the draw.
    With m >= C every class enters exactly and nothing is drawn (J = C, else J = m + 1).

    Why random signs: the J slots are summed into *one* pseudo-loss (one backward pass), and a
    pseudo-loss also sums over the tokens of a sequence, so the gradient's outer product holds
    cross products between slots and between tokens. A sampled v_y has mean zero, which kills
    them in expectation; a deterministic sqrt(p_c) v_c does not. An independent Rademacher sign
    per token and slot restores E[cross terms] = 0, so both the covariances and EK-FAC's
    Lambda stay unbiased; what is left of the cross terms is zero-mean noise that averages over
    tokens, instead of the all-or-nothing draw of a rare label.

    ``p``: probabilities [M, C], overwritten (the tail's CDF is built in place: on a
    vocabulary-sized p a copy costs as much as the rest); k = ``samples`` independent draws.
    """
    c = p.shape[-1]
    m = min(top, c)
    top_p, top_i = p.topk(m, dim=-1)  # [M, m]
    labels = top_i.expand(samples, *top_i.shape)
    weights = top_p.sqrt().expand(samples, *top_p.shape)
    if m < c:
        cdf = torch.cumsum(p.scatter_(-1, top_i, 0.0), dim=-1, out=p)  # the tail's CDF
        mass = cdf[:, -1:]
        u = torch.rand(samples, *mass.shape, device=p.device, dtype=p.dtype) * mass  # [k, M, 1]
        drawn = torch.searchsorted(cdf.expand(samples, *cdf.shape), u).clamp_(max=c - 1)
        labels = torch.cat([labels, drawn], dim=-1)
        weights = torch.cat([weights, mass.sqrt().expand(samples, *mass.shape)], dim=-1)
    return labels, weights * _rademacher(weights)


def _checked_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 or wider, after one cheap check that no output is NaN or inf."""
    if not all_finite(logits):
        raise NonFiniteError(
            "the model's outputs contain NaN or inf, so no Fisher can be estimated from them; "
            "check the weights and inputs, or run in float32"
        )
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _topk_losses(logits: torch.Tensor, samples: int, top: int) -> list[torch.Tensor]:
    """``samples`` pseudo-losses of the signed top-m-plus-tail estimator, from logits [M, C].

    Each is ``-sum_t sum_j w_tj log p_t(y_tj)`` over every slot of ``_topk_tail`` (fresh signs
    and tail draws per pseudo-loss), scaled by 1/sqrt(samples) so their outer products average.
    """
    log_probs = _checked_log_probs(logits)
    with torch.no_grad():
        labels, weights = _topk_tail(log_probs.detach().exp(), top, samples)  # [k, M, J]
    return [-(log_probs.gather(-1, y) * w).sum() * samples**-0.5 for y, w in zip(labels, weights)]


def _importance_labels(p: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and signed weights [M, k] drawn in proportion to each label's share of tr(H).

    With v_c = e_c - p, ``H = sum_c p_c v_c v_c^T`` and ``tr H = sum_c p_c |v_c|^2 = 1 - |p|^2``.
    Plain sampling draws c with probability p_c, so for a peaked p the rare tail labels, whose
    |v_c|^2 ~ 1 dwarfs the top label's ~(1 - p_top)^2, decide the estimate by luck. Drawing
    instead from ``q_c = p_c |v_c|^2 / tr H`` with weight ``sqrt(p_c / q_c)`` keeps E[w^2 v v^T] = H
    and makes ``|w v|^2 = tr H`` the same for every draw: the magnitude, the part that swings
    Lambda's mean and the damping, no longer depends on the seed; only the direction does.

    The weighted v has a nonzero mean, so a random sign per token and draw restores
    E[cross-token terms] = 0 for multi-token sequences (as a plain draw has by itself).
    ``p``: probabilities [M, C].
    """
    p2 = p.pow(2).sum(-1, keepdim=True)  # |p|^2
    trace = (1 - p2).clamp_min(0)
    share = p * (1 - 2 * p + p2)  # p_c |v_c|^2 >= 0 up to rounding
    labels = _inverse_cdf(share.clamp_min(0), samples)  # [M, k]
    v2 = (1 - 2 * p.gather(-1, labels) + p2).clamp_min(torch.finfo(p.dtype).tiny)  # |v_y|^2
    w = (trace / v2).sqrt() * samples**-0.5
    return labels, w * _rademacher(w)


def _importance_losses(logits: torch.Tensor, samples: int) -> list[torch.Tensor]:
    """``samples`` pseudo-losses of ``_importance_labels`` (one draw per token each)."""
    log_probs = _checked_log_probs(logits)
    with torch.no_grad():
        labels, weights = _importance_labels(log_probs.detach().exp(), samples)
    return _label_losses(log_probs, labels, weights)


def _softmax_gn_losses(logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """Pseudo-losses whose output gradients are sqrt(p_k)(e_k - p), k = 1..C (rows of logits).

    Their outer products sum to the softmax cross-entropy Hessian diag(p) - p p^T exactly.
    """
    p = torch.softmax(logits.detach().double(), dim=-1)
    for k in range(logits.shape[-1]):
        e_k = torch.zeros_like(p)
        e_k[..., k] = 1.0
        coef = (p[..., k : k + 1].sqrt() * (e_k - p)).to(logits.dtype)
        yield (logits * coef).sum()


class LanguageModelingTask(Task):
    """Causal language modelling with a HF-style model (``model(input_ids, attention_mask)``).

    Examples may be dicts with ``input_ids`` (and optional ``labels``, ``attention_mask``),
    or, when a tokenizer is given, strings, ``{"text": ...}`` or ``{"prompt", "completion"}``
    (only the completion is scored). Labels use -100 for tokens that are not scored; the model
    predicts ``labels[t + 1]`` from position ``t``.
    """

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
        logits = _logits(out)[:, :-1]
        return logits, batch["labels"][:, 1:]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        logits, targets = self._forward(model, batch)
        scored = targets != IGNORE
        if sample:
            with torch.no_grad():
                drawn = _sample_categorical(logits[scored])
            targets = targets.clone()
            targets[scored] = drawn
        return F.cross_entropy(
            _wide(logits.reshape(-1, logits.shape[-1])),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per scored token from one forward pass (see ``Task``)."""
        if _overrides_loss(self, LanguageModelingTask):
            return super().sampled_losses(model, batch, samples)
        logits, targets = self._forward(model, batch)
        logits = logits[targets != IGNORE]  # [M, V]
        with torch.no_grad():
            drawn = _sample_categorical(logits, samples)  # [M, k]
        return _label_losses(F.log_softmax(_wide(logits), dim=-1), drawn, samples**-0.5)

    def topk_losses(self, model: nn.Module, batch: Any, samples: int, top: int) -> list[torch.Tensor]:
        """The ``top`` likeliest tokens exactly plus one tail draw per scored token (``_topk_tail``)."""
        logits, targets = self._forward(model, batch)
        return _topk_losses(logits[targets != IGNORE], samples, top)  # [M, V]

    def importance_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` importance-weighted label draws per scored token (``_importance_labels``)."""
        logits, targets = self._forward(model, batch)
        return _importance_losses(logits[targets != IGNORE], samples)  # [M, V]

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

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"a classification batch must be (inputs, targets), got {type(batch).__name__}")
        return batch[0], batch[1]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        inputs, targets = self._split(batch)
        logits = _logits(model(inputs))
        if sample:
            with torch.no_grad():
                targets = _sample_categorical(logits)
        return F.cross_entropy(_wide(logits), targets, reduction="sum")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` label draws per example from one forward pass (see ``Task``)."""
        if _overrides_loss(self, ClassificationTask):
            return super().sampled_losses(model, batch, samples)
        inputs, _ = self._split(batch)
        logits = _logits(model(inputs))
        with torch.no_grad():
            drawn = _sample_categorical(logits, samples)  # [N, k]
        return _label_losses(F.log_softmax(_wide(logits), dim=-1), drawn, samples**-0.5)

    def topk_losses(self, model: nn.Module, batch: Any, samples: int, top: int) -> list[torch.Tensor]:
        """The ``top`` likeliest classes exactly plus one tail draw per example (``_topk_tail``)."""
        inputs, _ = self._split(batch)
        return _topk_losses(_logits(model(inputs)), samples, top)

    def importance_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` importance-weighted label draws per example (``_importance_labels``)."""
        inputs, _ = self._split(batch)
        return _importance_losses(_logits(model(inputs)), samples)

    def gauss_newton_losses(self, model: nn.Module, batch: Any) -> Iterator[torch.Tensor]:
        inputs, _ = self._split(batch)
        yield from _softmax_gn_losses(_logits(model(inputs)))


class RegressionTask(Task):
    """Batches ``(inputs, targets)``; loss ``sum ||model(x) - y||^2 / 2``.

    The Gauss-Newton output Hessian is the identity, so sampled pseudo-targets are
    ``y ~ N(model(x), I)`` and the exact pseudo-losses are the output coordinates.
    """

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"a regression batch must be (inputs, targets), got {type(batch).__name__}")
        return batch[0], batch[1]

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        inputs, targets = self._split(batch)
        pred = _logits(model(inputs))
        targets = targets.reshape(pred.shape).to(pred.dtype)
        if sample:
            with torch.no_grad():
                targets = pred + torch.randn_like(pred)
        return 0.5 * ((pred - targets) ** 2).sum()

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss(model, batch, sample=False)

    def sampled_losses(self, model: nn.Module, batch: Any, samples: int) -> list[torch.Tensor]:
        """``samples`` pseudo-target draws per example from one forward pass (see ``Task``)."""
        if _overrides_loss(self, RegressionTask):
            return super().sampled_losses(model, batch, samples)
        inputs, _ = self._split(batch)
        pred = _logits(model(inputs))
        with torch.no_grad():
            targets = pred + torch.randn((samples, *pred.shape), dtype=pred.dtype, device=pred.device)
        return [0.5 * ((pred - t) ** 2).sum() * samples**-0.5 for t in targets]  # x 1.0 is exact for k = 1

    def topk_losses(self, model: nn.Module, batch: Any, samples: int, top: int) -> list[torch.Tensor]:
        """Every output coordinate exactly, with a random sign each, summed: one backward pass.

        H = I has no tail to sample: the square-root factors are the coordinates themselves, and
        ``sum_d s_d pred_d`` with Rademacher s_d has E[s s^T] = I. For one output per example the
        signs square away and this *is* the exact Gauss-Newton. ``top`` has nothing to select.
        """
        inputs, _ = self._split(batch)
        pred = _logits(model(inputs))
        out = []
        for _ in range(samples):
            out.append((pred * _rademacher(pred.detach())).sum() * samples**-0.5)
        return out

    def gauss_newton_losses(self, model: nn.Module, batch: Any) -> Iterator[torch.Tensor]:
        inputs, _ = self._split(batch)
        pred = _logits(model(inputs))
        pred = pred.reshape(pred.shape[0], -1)
        for k in range(pred.shape[1]):
            yield pred[:, k].sum()


def _overrides_loss(task: Task, builtin: type) -> bool:
    """Whether a subclass replaced the built-in ``loss``: then its own loss must draw the labels."""
    return type(task).loss is not builtin.loss


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    return list(x)
