"""headwater.evaluate: how well do attribution scores predict what retraining would do?

- ``lds``: the linear datamodeling score against retraining on random subsets, with an
  on-disk cache of retrained measurements so interrupted runs resume.
- ``pbrf``: the proximal Bregman response function (Grosse et al. 2023, section 5.1), the
  quantity influence functions approximate, solved exactly for small models.
- ``lissa``: the LiSSA inverse-Gauss-Newton baseline over all tracked parameters.
- ``retrieval``: recall@k and MRR of known responsible documents (planted facts).
- ``trainers``: the built-in benchmark tasks (digits MLP, diabetes MLP, demo GPT-2).
- ``methods``: every compared method behind one ``run_method`` call.
- ``cli``: ``headwater evaluate lds|pbrf|retrieval``.

Sign convention everywhere: a score is ``grad f_q^T (G + lambda I)^-1 grad L_m`` and positive
means that upweighting training example m lowers the query's measurement f_q.
"""

from .lds import Correlation, LDSResult, correlation_summary, lds, retrain_measurements, sample_subsets
from .lissa import LiSSA
from .pbrf import PBRF, PBRFResponse, PBRFScores, pearson_per_query
from .retrieval import RetrievalResult, relevant_from_labels, retrieval

__all__ = [
    "sample_subsets",
    "retrain_measurements",
    "lds",
    "LDSResult",
    "Correlation",
    "correlation_summary",
    "PBRF",
    "PBRFResponse",
    "PBRFScores",
    "pearson_per_query",
    "LiSSA",
    "retrieval",
    "relevant_from_labels",
    "RetrievalResult",
]
