"""Integrations with training loops: record a run so that SOURCE runs afterwards from the record alone.

- ``HeadwaterCallback``: a ``transformers.Trainer`` callback (``hf``).
- ``TrainingRecorder``: the same for a plain PyTorch loop (hooks on the optimizer's ``step``).
- ``source_from_training(directory, data, ...)``: the ``headwater.training.Source`` of a record.
"""

from ..training.record import TrainingRecorder, read_record, source_from_training
from .hf import HeadwaterCallback, default_loss_scale

__all__ = ["HeadwaterCallback", "TrainingRecorder", "default_loss_scale", "read_record", "source_from_training"]
