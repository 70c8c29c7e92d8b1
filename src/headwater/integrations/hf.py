"""``HeadwaterCallback``: record a ``transformers.Trainer`` run for SOURCE.

    from headwater.integrations import HeadwaterCallback
    trainer = Trainer(model, args, train_dataset=train, callbacks=[HeadwaterCallback("runs/record", segments=6)])
    trainer.train()
    # later (fine-tuning on other data adds a stage to the same record):
    src = headwater.training.source_from_training("runs/record", train, task=hw.LanguageModelingTask())

It is a thin adapter over ``headwater.training.TrainingRecorder``: at ``on_train_begin`` it hooks
the Trainer's (accelerate-wrapped) optimizer, so every optimizer step's learning rate is recorded
as used, and segments end every ``every`` steps or at ``segments`` equal parts of
``state.max_steps``; ``on_train_end`` closes the last segment at the final weights. What is
written (weights, Adam's bias-corrected second moments, per-group learning-rate sums and weight
decay, the stage's data fingerprint, the loss normalisation) is described in ``training.record``.

The Trainer's causal-LM loss is the mean over the batch's scored tokens, so ``loss_scale="auto"``
records "token" for ``*ForCausalLM`` / ``*LMHeadModel`` models and 1.0 (mean over examples)
otherwise. Gradient accumulation does not change this (the Trainer averages over the
accumulated batches too).

Cost: two Python hooks per optimizer step (not measurable against a 2.5 ms step); at each segment
end, one copy of the weights and of Adam's second moments to disk
(``benchmarks/results/training_aware.md``). K-FAC covariances are not accumulated during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..training.record import TrainingRecorder

try:  # transformers is a dependency; the callback's base class is only needed when it is importable
    from transformers import TrainerCallback
except Exception:  # pragma: no cover - transformers broken or absent
    TrainerCallback = object  # type: ignore[misc,assignment]

__all__ = ["HeadwaterCallback", "default_loss_scale"]


def default_loss_scale(model: Any) -> float | str:
    """'token' for HF causal language models (the Trainer's loss is a token mean), else 1.0."""
    name = type(model).__name__
    return "token" if name.endswith(("ForCausalLM", "LMHeadModel")) else 1.0


class HeadwaterCallback(TrainerCallback):
    """Records segments, the learning-rate schedule, Adam's moments and the stage's data for SOURCE.

    Parameters
    ----------
    directory : the record directory (a second training run on it adds a stage).
    segments : equal segments over ``state.max_steps`` (default 3), unless ``every`` is given.
    every : end a segment every this many optimizer steps.
    stage : this run's stage name (default "stage0", "stage1", ...).
    data : the stage's training set, for the fingerprint; default the Trainer's ``train_dataset``
        when it is sized and indexable (fingerprinting reads every example once).
    loss_scale : "auto" (see the module docstring), "token" or a number.
    """

    def __init__(
        self,
        directory: str | Path,
        segments: int | None = None,
        every: int | None = None,
        stage: str | None = None,
        data: Any = None,
        loss_scale: float | str = "auto",
    ):
        if segments is not None and every is not None:
            raise ValueError("give segments= or every=, not both")
        self.directory, self.segments, self.every = Path(directory), segments, every
        self.stage, self.data, self.loss_scale = stage, data, loss_scale
        self.recorder: TrainingRecorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("HeadwaterCallback needs the Trainer's model and optimizer at on_train_begin")
        data = self.data
        if data is None:
            loader = kwargs.get("train_dataloader")
            dataset = getattr(loader, "dataset", None)
            data = dataset if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") else None
        scale = default_loss_scale(model) if self.loss_scale == "auto" else self.loss_scale
        segments = None if self.every is not None else (self.segments or 3)
        batch = args.per_device_train_batch_size * max(1, args.gradient_accumulation_steps)
        self.recorder = TrainingRecorder(
            self.directory,
            model,
            optimizer,
            every=self.every,
            segments=segments,
            total_steps=None if self.every is not None else state.max_steps,
            data=data,
            stage=self.stage,
            loss_scale=scale,
            batch_size=batch,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
