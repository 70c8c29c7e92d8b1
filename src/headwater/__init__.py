"""headwater: which training examples made a model behave like this?

Influence functions with an EK-FAC Gauss-Newton approximation, after Grosse, Bae, Anil et al.
(2023), "Studying Large Language Model Generalization with Influence Functions".

The public names load on first use (PEP 562), so ``import headwater`` is cheap and the command
line answers ``--help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Attributor": "attributor",
    "Settings": "attributor",
    "STRATEGIES": "attributor",
    "FISHERS": "fisher",
    "NotFittedError": "errors",
    "NonFiniteError": "errors",
    "HeadwaterWarning": "errors",
    "CorruptArtifactError": "storage",
    "Scores": "scoring",
    "TopK": "scoring",
    "Task": "task",
    "LanguageModelingTask": "task",
    "ClassificationTask": "task",
    "RegressionTask": "task",
    "SequenceClassificationTask": "task",
    "Seq2SeqTask": "task",
    "TokenMasks": "task",
    "UntrackedWarning": "layers",
    "describe_layers": "layers",
    "coverage": "layers",
    "Unrolled": "training",
    "Source": "training",
    "Segment": "training",
}
_SUBMODULES = (
    "analysis",
    "attributor",
    "curvature",
    "data",
    "engine",
    "evaluate",
    "filtering",
    "fisher",
    "index",
    "io",
    "layers",
    "plan",
    "adapters",
    "experts",
    "refine",
    "report",
    "scoring",
    "storage",
    "task",
    "workdir",
    "workflow",
    "training",
    "integrations",
    "ranking",
)

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'headwater' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
