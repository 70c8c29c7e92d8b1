"""Built-in benchmark tasks: a trained model, its data and queries, and how to retrain it.

Each ``Benchmark`` bundles what the accuracy benchmark and ``headwater evaluate`` need:

- ``digits``: a 64-32-10 tanh MLP on scikit-learn's bundled ``load_digits`` (classification).
- ``regression``: a 10-32-1 tanh MLP on scikit-learn's bundled ``load_diabetes``, targets
  standardized (regression).
- ``lm``: the small GPT-2-architecture model of ``headwater.synthetic`` on its planted-fact corpus
  (language modelling; the queries ask for the planted facts).

The MLPs train full-batch with Adam on the mean loss plus an L2 penalty. Full-batch training
makes a retrained model depend only on its subset and initialisation seed, and the L2 penalty
gives the objective a unique, well-conditioned optimum, so the retraining noise that LDS
averages over stays small. Nothing here downloads anything: both data sets ship with
scikit-learn.

Example::

    bench = load_benchmark("digits")
    y = bench.retrain(torch.arange(100), seed=0)   # query losses after training on 100 examples
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..task import ClassificationTask, LanguageModelingTask, RegressionTask, Task

__all__ = ["Benchmark", "MLPConfig", "LMConfig", "BENCHMARKS", "load_benchmark", "query_measurements"]


@dataclass
class Benchmark:
    """A trained model with its data, queries and retraining function.

    retrain(subset_indices, seed) -> [Q] measurements of the queries after training a fresh model
    on ``train[subset_indices]`` from initialisation ``seed``. ``relevant`` (LM only) lists, per
    query, the training documents that state its fact. ``config`` describes the setup and tags
    LDS caches.
    """

    name: str
    model: nn.Module
    task: Task
    train: list
    queries: list
    retrain: Callable[[torch.Tensor, int], torch.Tensor]
    modules: None | str | list[str] = None
    batch_size: int = 64
    relevant: list[set[int]] | None = None
    config: dict = field(default_factory=dict)


@dataclass
class MLPConfig:
    """The MLP tasks' sizes and training schedule.

    n_train: 400 keeps dense references (exact GN over ~2.4k parameters, PBRF) cheap.
    steps/lr: full-batch Adam reaches a loss plateau in a few hundred steps on these sets.
    weight_decay: L2 on the mean loss; without it the digits MLP keeps growing its weights on
    separable data and retrained measurements wander with the step count.
    """

    hidden: int = 32
    n_train: int = 400
    n_queries: int = 50
    steps: int = 400
    lr: float = 0.01
    weight_decay: float = 1e-3
    split_seed: int = 0


def _mlp(n_in: int, hidden: int, n_out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _fit_mlp(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, cfg: MLPConfig) -> nn.Module:
    """Full-batch Adam on mean loss + (weight_decay/2) ||theta||^2."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, (x, y)) / len(x)
        penalty = sum((p * p).sum() for p in model.parameters())
        (loss + 0.5 * cfg.weight_decay * penalty).backward()
        opt.step()
    model.eval()
    return model


def query_measurements(model: nn.Module, task: Task, queries: list) -> torch.Tensor:
    """``task.measurement`` of each query on its own: [Q] (a task's measurement sums over a batch)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.stack([task.measurement(model, task.collate([q])).double() for q in queries])
    finally:
        model.train(was)


def _mlp_benchmark(name: str, x: torch.Tensor, y: torch.Tensor, task: Task, n_out: int, cfg: MLPConfig) -> Benchmark:
    gen = torch.Generator().manual_seed(cfg.split_seed)
    perm = torch.randperm(len(x), generator=gen)
    tr, qu = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_queries]
    x_tr, y_tr, x_q, y_q = x[tr], y[tr], x[qu], y[qu]
    train = [(x_tr[i], y_tr[i]) for i in range(len(tr))]
    queries = [(x_q[i], y_q[i]) for i in range(len(qu))]

    def fit(subset: torch.Tensor, seed: int) -> nn.Module:
        return _fit_mlp(_mlp(x.shape[1], cfg.hidden, n_out, seed), task, x_tr[subset], y_tr[subset], cfg)

    def retrain(subset: torch.Tensor, seed: int) -> torch.Tensor:
        return query_measurements(fit(torch.as_tensor(subset), seed), task, queries)

    model = fit(torch.arange(len(tr)), 0)
    config = {"benchmark": name, **asdict(cfg)}
    return Benchmark(name, model, task, train, queries, retrain, None, 64, None, config)


def _sklearn_dataset(loader: str) -> Any:
    """A data set bundled with scikit-learn (read from its package files, no download)."""
    try:
        import sklearn.datasets
    except ImportError as e:
        raise ImportError(
            f"the MLP benchmarks read {loader.removeprefix('load_')} from scikit-learn's bundled data; "
            "pip install scikit-learn"
        ) from e
    return getattr(sklearn.datasets, loader)()


def digits_benchmark(cfg: MLPConfig | None = None) -> Benchmark:
    """MLP classifier on sklearn's 8x8 digits (1797 images shipped with scikit-learn)."""
    cfg = cfg or MLPConfig()
    d = _sklearn_dataset("load_digits")
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return _mlp_benchmark("digits", x, y, ClassificationTask(), 10, cfg)


def regression_benchmark(cfg: MLPConfig | None = None) -> Benchmark:
    """MLP regressor on sklearn's diabetes set (442 patients, 10 features), targets standardized.

    weight_decay 0.03: with the classifier's 1e-3 the MLP overfits 300 patients (held-out loss
    0.55, worse than predicting the mean); 0.03 gives 0.23 (R^2 about 0.5, typical for this set).
    """
    cfg = cfg or MLPConfig(n_train=300, n_queries=50, weight_decay=0.03)
    d = _sklearn_dataset("load_diabetes")
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(d.target, dtype=torch.float32)
    y = ((y - y.mean()) / y.std()).unsqueeze(1)
    return _mlp_benchmark("regression", x, y, RegressionTask(), 1, cfg)


@dataclass
class LMConfig:
    """The LM task: ``headwater.synthetic``'s corpus and model (full size: the small demo model
    answers almost none of its queries, so its attributions have nothing to find).

    modules: the MLP projections, as in the demo and the paper.
    """

    small: bool = False
    corpus_seed: int = 0
    n_queries: int | None = None
    modules: str = "mlp"


def lm_benchmark(cfg: LMConfig | None = None) -> Benchmark:
    """The demo GPT-2 on the planted-fact corpus; retraining calls ``synthetic.train_model`` on a subset."""
    from .. import synthetic as demo

    cfg = cfg or LMConfig()
    corpus = demo.make_corpus(seed=cfg.corpus_seed, small=cfg.small)
    tokenizer = demo.train_tokenizer(corpus.docs, vocab_size=(demo.SMALL if cfg.small else demo.FULL).vocab_size)
    task = LanguageModelingTask(tokenizer=tokenizer)
    train = list(corpus.docs)
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in corpus.queries]
    facts = [q["fact"] for q in corpus.queries]
    if cfg.n_queries is not None:
        queries, facts = queries[: cfg.n_queries], facts[: cfg.n_queries]
    from .retrieval import relevant_from_labels

    relevant = relevant_from_labels(corpus.doc_facts, facts)

    def retrain(subset: torch.Tensor, seed: int) -> torch.Tensor:
        docs = [train[int(i)] for i in subset]
        return query_measurements(demo.train_model(docs, tokenizer, seed=seed, small=cfg.small), task, queries)

    model = demo.train_model(train, tokenizer, seed=0, small=cfg.small)
    config = {"benchmark": "lm", **asdict(cfg)}
    return Benchmark("lm", model, task, train, queries, retrain, cfg.modules, 32, relevant, config)


BENCHMARKS: dict[str, Callable[[], Benchmark]] = {
    "digits": digits_benchmark,
    "regression": regression_benchmark,
    "lm": lm_benchmark,
}


def load_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """Build (train) one of the built-in benchmarks by name: ``digits``, ``regression`` or ``lm``."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r} is unknown; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](**kwargs)
