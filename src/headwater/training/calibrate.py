"""``calibrate_damping``: the damping scale that best predicts warm-started retraining, when the run is unknown.

The paper's damping (0.1 x mean eigenvalue per layer) is LDS-best on some tasks and 0.02-0.05 LDS
short on others (``benchmarks/results/fisher.md``, ``training_aware.md``). Without the training
run, ``calibrate_damping`` measures the scale on the trained model itself, with a small, fast LDS:

1. M random subsets (fraction ``alpha``) of the training data, drawn from the examples that are
   not probes. Probes: the queries if given, else ``probes`` held-out training examples.
2. From the final weights, ``steps`` full-batch Adam steps on each subset's mean loss (plus the
   implied L2 below), and the change of every probe's measurement: M short warm-started retrainings.
3. For each damping scale s, the influence prediction ``-sum_{m in S} score_s(q, m)``; the local
   LDS is its Spearman correlation with the measured change over the subsets, per probe, averaged.
   All scales are scored in one pass over the data (their preconditioned probe gradients stacked).
4. The scale with the highest local LDS (averaged with its grid neighbours) is chosen; the curve
   (JSON-able) comes with it.

Also reported: the weight decay the trained weights imply, ``-<mean gradient, theta> / |theta|^2``
over the tracked layers (at a stationary point of ``mean loss + wd/2 |theta|^2`` the data's gradient
balances the decay); it is used as the local runs' L2 and recorded, not added to the damping.

Why Adam and full batches: a warm start with SGD, or a horizon that is too short, leaves the low-
curvature directions unconverged, and any damping that truncates them then predicts best, so the
test picks the largest scale whatever the task (measured: ``training_aware.md``). Minibatch steps
were too noisy at equal cost. The default step (``lr``: 2% of the tracked weights' RMS) and horizon
(50 steps) were chosen on the digits and regression benchmarks among three candidates.

Cost: M x steps full-batch gradient evaluations over an ``alpha`` share of the data, one pass for
the probe gradients and one scoring pass; ``Calibration.cost_fits`` divides the example-gradient
count by that of one EK-FAC fit (2 passes over the data). With the defaults that is
``8 x 50 x 0.5 / 2 = 100`` fits, far above the 3 the issue asks for; in wall time on the MLP
benchmarks (where full-batch steps are cheap) 21-37 fits. Use it where retraining is affordable.
Measured: within 0.02 LDS of the damping sweep's best on 5 of 6 settings
(``benchmarks/results/training_aware.md``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..curvature import IdentityCurvature
from ..data import Subset, check_data, fingerprint, iter_batches
from ..engine import spec_key
from ..errors import NotFittedError
from ..gauss_newton import ParameterSpace
from ..scoring import QueryGradientConsumer, QueryGradients, ScoreAccumulator
from ..storage import load_json, model_fingerprint, save_json
from ..validation import check_int, check_number, check_seed
from ..workdir import CALIBRATION_FILE

__all__ = ["Calibration", "calibrate_damping", "DEFAULT_SCALES"]

DEFAULT_SCALES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass
class Calibration:
    """The chosen damping scale (x mean eigenvalue per layer), its absolute values, and the local-LDS curve."""

    scale: float
    damping: dict[str, float]
    curve: list[dict]  # [{"scale", "local_lds", "low", "high", "smoothed"}], in scale order
    implied_weight_decay: float
    cost_fits: float  # example-gradient evaluations / those of one EK-FAC fit
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> Calibration:
        keys = {"scale", "damping", "curve", "implied_weight_decay", "cost_fits", "seconds", "settings"}
        return cls(**{k: obj[k] for k in keys})


def _layer_means(curvature: dict) -> dict[str, float]:
    return {n: float(op.eigenvalues().double().mean()) for n, op in curvature.items()}


def _implied_weight_decay(model: Any, layers: dict, dot_mean: float) -> float:
    """``-<mean gradient, theta> / |theta|^2`` over the tracked layers, floored at 0."""
    blocks = ParameterSpace(model, layers).from_params({k: v.detach() for k, v in model.named_parameters()})
    sq = sum(float(b.double().pow(2).sum()) for b in blocks.values())
    return max(0.0, -dot_mean / sq) if sq > 0 else 0.0


def _measure(model: Any, task: Any, probes: Any, batch_size: int) -> torch.Tensor:
    """Each probe's measurement, [Q] float64 (the task's measurement sums over a batch, so one at a time)."""
    out = []
    with torch.no_grad():
        for _, batch in iter_batches(probes, task, 1, "probes"):
            out.append(task.measurement(model, task.to_device(batch, next(model.parameters()).device)).double())
    return torch.stack(out).cpu()


def _finetune(model: Any, task: Any, data: Any, steps: int, lr: float, weight_decay: float, batch_size: int) -> None:
    """``steps`` full-batch Adam steps on the mean loss over ``data`` (gradients accumulated over batches)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    n = len(data)
    model.eval()  # no dropout: the response, not the noise, is measured
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _, batch in iter_batches(data, task, batch_size, "calibration subset"):
            (task.loss(model, task.to_device(batch, device)) / n).backward()
        opt.step()


def calibrate_damping(
    attributor: Any,
    train: Any,
    queries: Any = None,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    subsets: int = 8,
    alpha: float = 0.5,
    steps: int = 50,
    lr: float | None = None,
    probes: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> Calibration:
    """Choose the damping scale by a small LDS against warm-started retraining (module docstring).

    ``attributor`` must be fitted (any strategy with eigenvalues). With a workdir, the result is
    cached there (``calibration.json``, keyed by the factors, model, data and settings).
    Returns a ``Calibration``; ``calibration.damping`` is the per-layer damping to pass on.
    Long because the procedure is one experiment best read in order: subsets, warm-started
    retraining, the measured loss changes, then one LDS per candidate scale and the cache.
    """
    from ..evaluate.lds import lds, sample_subsets  # scipy: imported only when calibrating

    an = attributor
    curvature = an.curvature
    if curvature is None:
        raise NotFittedError("calibrate_damping needs a fitted Attributor; call an.fit(train) first")
    if all(isinstance(op, IdentityCurvature) for op in curvature.values()):
        raise ValueError("strategy='identity' ignores damping, so there is nothing to calibrate; use 'ekfac'")
    train = check_data(train, "training data")
    scales = tuple(check_number(s, "scales", low=0.0, low_inclusive=False) for s in scales)
    if len(scales) < 2:
        raise ValueError(f"scales must hold at least 2 damping scales to choose from, got {scales}")
    subsets = check_int(subsets, "subsets", low=3)
    alpha = check_number(alpha, "alpha", low=0.0, low_inclusive=False, high=0.99)
    steps = check_int(steps, "steps")
    probes = check_int(probes, "probes")
    batch_size = check_int(batch_size, "batch_size")
    seed = check_seed(seed)
    blocks = ParameterSpace(an.model, an.layers).from_params({k: v.detach() for k, v in an.model.named_parameters()})
    rms = (
        sum(float(b.double().pow(2).sum()) for b in blocks.values()) / sum(b.numel() for b in blocks.values())
    ) ** 0.5
    lr = 0.02 * rms if lr is None else check_number(lr, "lr", low=0.0, low_inclusive=False)
    settings = {"scales": list(scales), "subsets": subsets, "alpha": alpha, "steps": steps, "lr": lr, "seed": seed}
    cache = None
    if an.workdir is not None:
        spec = {
            "factors": an.factors_checksum,
            "model": model_fingerprint(an.model),
            "train": fingerprint(train),
            "queries": None if queries is None else fingerprint(queries),
            "settings": settings,
            "probes": probes,
        }
        cache = an.workdir.path / CALIBRATION_FILE
        if cache.exists():
            saved = load_json(cache, hint="delete it to recalibrate")
            if saved.get("spec") == spec_key(spec):
                return Calibration.from_json(saved["calibration"])
    t0 = time.perf_counter()
    n = len(train)
    gen = torch.Generator().manual_seed(seed)
    if queries is None:
        order = torch.randperm(n, generator=gen)
        held = order[: min(probes, n // 4)]
        pool = order[min(probes, n // 4) :].sort().values
        probe_data = Subset(train, held.tolist())
    else:
        pool, probe_data = torch.arange(n), check_data(queries, "queries")
    picks = pool[sample_subsets(len(pool), subsets, alpha, seed)]  # [M, k] indices into train

    # probe gradients, preconditioned at every scale, plus theta for the implied weight decay: one scoring pass
    consumer = QueryGradientConsumer(list(an.layers), None, {}, None)
    an.run(probe_data, consumer, an.measurement, "calibration probes", batch_size, name="probes", shard=False)
    raw = {name: q.full for name, q in consumer.result().items()}
    means = _layer_means(curvature)
    stacked = {}
    for name, g in raw.items():
        parts = [curvature[name].solve(g, s * means[name]) for s in scales]
        stacked[name] = QueryGradients(full=torch.cat([*parts, blocks[name].to(g)[None]]))
    acc = ScoreAccumulator(stacked, n, False, False)
    an.run(train, acc, an.training_loss, "calibration scoring", batch_size)
    values = acc.result({}).values.double()  # [S * Q + 1, N]
    q = len(probe_data)
    wd = _implied_weight_decay(an.model, an.layers, float(values[-1].mean()))

    # the short warm-started retrainings
    before = _measure(an.model, an.task, probe_data, batch_size)
    work = copy.deepcopy(an.model)
    start = {k: v.detach().clone() for k, v in an.model.state_dict().items()}
    changes = []
    for subset in picks:
        work.load_state_dict(start)
        _finetune(work, an.task, Subset(train, subset.tolist()), steps, lr, wd, batch_size)
        changes.append(_measure(work, an.task, probe_data, batch_size) - before)
    measured = torch.stack(changes)  # [M, Q]

    curve = []
    for k, s in enumerate(scales):
        res = lds(values[k * q : (k + 1) * q], picks, measured)
        curve.append({"scale": s, "local_lds": res.mean, "low": res.low, "high": res.high})
    best = _smoothed_best(curve)
    examples = subsets * steps * len(picks[0]) + n + q
    return _finish(
        Calibration(
            best["scale"],
            {name: best["scale"] * m for name, m in means.items()},
            curve,
            wd,
            examples / (2 * n),
            time.perf_counter() - t0,
            settings,
        ),
        cache,
        spec_key(spec) if cache is not None else None,
        an.factors_checksum,
    )


def _smoothed_best(curve: list[dict]) -> dict:
    """The point whose local LDS, averaged with its neighbours on the (log-spaced) grid, is highest.

    With 8 subsets the curve is noisy near its top (0.01 LDS between neighbours); the average
    picks the middle of a plateau rather than the edge one noisy point lands on.
    """
    vals = [c["local_lds"] for c in curve]
    if all(v != v for v in vals):
        raise ValueError(
            "no probe's measurement changed over the calibration runs (every local LDS is undefined); raise steps= "
            "or lr=, or give queries="
        )
    smooth = []
    for k in range(len(vals)):
        near = [v for v in vals[max(0, k - 1) : k + 2] if v == v]
        smooth.append(sum(near) / len(near) if near and vals[k] == vals[k] else float("-inf"))
    best = curve[max(range(len(curve)), key=smooth.__getitem__)]
    for c, v in zip(curve, smooth):  # JSON has no NaN: an undefined point is null
        c["smoothed"] = v if v != float("-inf") else None
        for k in ("local_lds", "low", "high"):
            c[k] = c[k] if c[k] == c[k] else None
    return best


def _finish(cal: Calibration, cache: Any, key: str | None, factors: str | None = None) -> Calibration:
    if cache is not None:
        save_json(cache, {"spec": key, "factors": factors, "calibration": cal.to_json()})
    return cal


def calibrated_damping(an: Any) -> dict[str, float]:
    """The per-layer damping saved by ``calibrate_damping`` in ``an``'s workdir (``an.damping("calibrate")``)."""
    return an.damping("calibrate")
