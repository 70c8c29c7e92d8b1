"""headwater: which training examples made a model behave like this?

Influence functions with an EK-FAC Gauss-Newton approximation, after Grosse, Bae, Anil et al.
(2023), "Studying Large Language Model Generalization with Influence Functions".
"""

__version__ = "0.1.0"

from .attributor import FISHERS, STRATEGIES, Attributor, NotFittedError  # noqa: E402
from .errors import NonFiniteError  # noqa: E402
from .scoring import Scores, TopK  # noqa: E402
from .task import ClassificationTask, LanguageModelingTask, RegressionTask, Task  # noqa: E402

__all__ = [
    "Attributor",
    "Task",
    "LanguageModelingTask",
    "ClassificationTask",
    "RegressionTask",
    "Scores",
    "TopK",
    "NotFittedError",
    "NonFiniteError",
    "STRATEGIES",
    "FISHERS",
    "__version__",
]
