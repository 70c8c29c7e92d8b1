"""Training-aware attribution: the unrolled response, SOURCE over checkpoints, TracIn-style ensembles,
records of a training run, and a damping calibrated by a local response test.

- ``Unrolled(lr, steps, weight_decay)``: ``an.scores(..., response=Unrolled(...))`` scores with the
  response of ``steps`` gradient steps instead of the converged one (``responses``).
- ``Source(model, checkpoints, segments, train, ...)``: SOURCE (Bae et al. 2024); ``Segment`` says
  what each stretch of training did; ``Source.tracin`` gives the TracIn-CP baselines (``source``).
- ``AdamPreconditioner``: Adam's second moments, applied in the curvature's eigenbasis (``preconditioner``).
- ``TrainingRecorder`` / ``source_from_training``: write a run's segments while training, and
  build the ``Source`` from that directory afterwards (``record``).
- ``calibrate_damping``: the damping scale that best predicts short fine-tuning runs (``calibrate``).
"""

from .calibrate import Calibration, calibrate_damping, calibrated_damping
from .preconditioner import AdamPreconditioner, eigen_diagonal, fitted_curvature, with_diagonal
from .record import TrainingRecorder, read_record, source_from_training
from .responses import Decay, PreconditionedDecay, PreconditionedUnrolled, Unrolled, unrolled_gain
from .source import OPTIMIZERS, Segment, SegmentDynamics, Source, read_state_dict

__all__ = [
    "Unrolled",
    "Decay",
    "PreconditionedUnrolled",
    "PreconditionedDecay",
    "unrolled_gain",
    "Segment",
    "Source",
    "SegmentDynamics",
    "OPTIMIZERS",
    "read_state_dict",
    "AdamPreconditioner",
    "fitted_curvature",
    "eigen_diagonal",
    "with_diagonal",
    "TrainingRecorder",
    "read_record",
    "source_from_training",
    "Calibration",
    "calibrate_damping",
    "calibrated_damping",
]
