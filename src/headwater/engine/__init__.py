"""The engine: one capture mechanism and one pass loop that every phase of headwater consumes."""

from .capture import Capture, LayerCapture, per_example_grads
from .passes import Checkpoint, Consumer, derive_seed, eval_mode, is_sharded, model_device, run_pass, spec_key

__all__ = [
    "Capture",
    "LayerCapture",
    "per_example_grads",
    "Checkpoint",
    "Consumer",
    "derive_seed",
    "eval_mode",
    "is_sharded",
    "model_device",
    "run_pass",
    "spec_key",
]
