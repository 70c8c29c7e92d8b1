"""Training-aware attribution where the influence function's assumptions fail: LDS and cost per method.

    python benchmarks/training_aware.py                       # writes benchmarks/results/training_aware.md
    python benchmarks/training_aware.py --tasks digits --settings early --subsets 20 --out ''   # a quick look

Tasks: the digits MLP (64-32-10 tanh, cross-entropy, 400 training examples, weight decay 1e-3) and
the diabetes regression MLP (10-32-1 tanh, squared error, 300 examples, weight decay 0.03) of
``headwater.evaluate.trainers``, trained full-batch with Adam (lr 0.01, L2 in the gradient) from a
fixed initialisation per seed. Settings:

- ``early``: stopped after 100 steps (1/4 of the 400 the built-in benchmark trains for).
- ``two-stage``: 400 steps on part A, then a fresh Adam at lr 0.003 for 100 steps on part B (digits:
  A = classes 0-4, B = classes 5-9; regression: A / B = below / above the median of the first
  feature); the queries are held-out examples of B's kind (the fine-tuning "facts").
- ``converged``: the built-in 400 steps.

Every run is recorded with ``headwater.training.TrainingRecorder`` (6 segments: 2 per 100 steps of
one-stage runs, 4 + 2 for two-stage), and SOURCE is built by ``source_from_training``, so every
hyperparameter comes from the record. 3- and 1-segment SOURCE merge neighbouring segments (the
checkpoint and Adam state at the end, the learning-rate sums added). LDS: ``--subsets`` random
halves, each retrained (all stages, on the subset's share of each) under ``--retrain-seeds``
initialisations, cached under ``--cache``.

Methods (nothing is tuned per benchmark): influence = EK-FAC at the paper's damping, fitted on all
training data at the final weights; the damping sweep (scales of mean Lambda per layer, for
reference: it peeks at the LDS); ``Unrolled`` in its SGD form with the true lr x steps and weight
decay (what ``an.scores(response=Unrolled(...))`` gives when Adam is ignored); SOURCE with 1, 3, 6
segments (Adam-preconditioned, damping 0 plus the true weight decay); TracIn-CP over the 6
checkpoints (lr x gradient dot products) and the ensemble of EK-FAC influence over them;
``calibrate_damping`` (its chosen damping, then plain EK-FAC influence); kronfluence's EK-FAC when
installed. Threads are pinned to ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import headwater as hw
from headwater.curvature import EigenCurvature
from headwater.data import Subset
from headwater.evaluate import lds, retrain_measurements, sample_subsets
from headwater.evaluate.methods import kronfluence_available
from headwater.evaluate.trainers import query_measurements
from headwater.gauss_newton import ParameterSpace, dense_gauss_newton, layer_gradients
from headwater.storage import atomic_write_text
from headwater.training import AdamPreconditioner, Source, Unrolled, calibrate_damping, source_from_training
from headwater.training.record import TrainingRecorder

SCALES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass
class Stage:
    data: list[int]  # indices into the training set
    steps: int
    lr: float
    segments: int  # recorded segments in this stage


@dataclass
class Setting:
    name: str
    task: hw.Task
    x: torch.Tensor
    y: torch.Tensor
    queries: list
    stages: list[Stage]
    n_out: int
    weight_decay: float
    hidden: int = 32

    @property
    def train(self) -> list:
        return [(self.x[i], self.y[i]) for i in range(len(self.x))]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(self.x.shape[1], self.hidden), nn.Tanh(), nn.Linear(self.hidden, self.n_out))

    def fit(self, subset: torch.Tensor | None, seed: int, record: Path | None = None) -> nn.Module:
        """Train every stage (full-batch Adam, fresh per stage) on its data, restricted to ``subset``."""
        model = self.model(seed)
        keep = None if subset is None else set(int(i) for i in subset)
        for k, st in enumerate(self.stages):
            idx = torch.tensor([i for i in st.data if keep is None or i in keep])
            opt = torch.optim.Adam(model.parameters(), lr=st.lr, weight_decay=self.weight_decay)
            rec = None
            if record is not None:
                bounds = [round(st.steps * (j + 1) / st.segments) for j in range(st.segments - 1)]
                data = Subset(self.train, st.data)
                rec = TrainingRecorder(record, model, opt, boundaries=bounds, data=data, stage=f"stage{k}")
            model.train()
            x, y = self.x[idx], self.y[idx]
            for _ in range(st.steps):
                opt.zero_grad(set_to_none=True)
                (self.task.loss(model, (x, y)) / len(idx)).backward()
                opt.step()
            if rec is not None:
                rec.close()
        return model.eval()


def _sklearn_dataset(loader: str):
    import sklearn.datasets

    return getattr(sklearn.datasets, loader)()


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, n_queries: int, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train : n_train + n_queries]


def make_setting(task: str, setting: str) -> Setting:
    if task == "digits":
        d = _sklearn_dataset("load_digits")
        x_all = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y_all = torch.tensor(d.target, dtype=torch.long)
        htask, n_out, wd, n_train = hw.ClassificationTask(), 10, 1e-3, 400
        side = y_all >= 5  # part B: classes 5-9
    else:
        d = _sklearn_dataset("load_diabetes")
        x_all = torch.tensor(d.data, dtype=torch.float32)
        x_all = (x_all - x_all.mean(0)) / x_all.std(0)
        y_all = torch.tensor(d.target, dtype=torch.float32)
        y_all = ((y_all - y_all.mean()) / y_all.std()).unsqueeze(1)
        htask, n_out, wd, n_train = hw.RegressionTask(), 1, 0.03, 300
        side = x_all[:, 0] > x_all[:, 0].median()
    tr, qu = _split(x_all, y_all, n_train, 3 * 50 if setting == "two-stage" else 50)
    if setting == "two-stage":
        qu = qu[side[qu]][:50]  # queries of part B's kind
    x, y = x_all[tr], y_all[tr]
    everything = list(range(len(tr)))
    if setting == "early":
        stages = [Stage(everything, 100, 0.01, 6)]
    elif setting == "converged":
        stages = [Stage(everything, 400, 0.01, 6)]
    else:
        b = side[tr]
        stages = [
            Stage([i for i in everything if not b[i]], 400, 0.01, 4),
            Stage([i for i in everything if b[i]], 100, 0.003, 2),
        ]
    queries = [(x_all[i], y_all[i]) for i in qu]
    return Setting(f"{task}/{setting}", htask, x, y, queries, stages, n_out, wd)


def merge(src: Source, groups: list[list[int]]) -> Source:
    """A coarser SOURCE: each group of consecutive segments becomes one (its last checkpoint and Adam state)."""
    segs, ckpts = [], []
    for g in groups:
        last = src.segments[g[-1]]
        lr_sum = sum(src.segments[i].lr * src.segments[i].steps for i in g)
        steps = sum(src.segments[i].steps for i in g)
        data = sorted({j for i in g for j in (src.segments[i].data or range(len(src.train)))})
        segs.append(replace(last, lr=lr_sum / steps, steps=steps, data=None if len(data) == len(src.train) else data))
        ckpts.append(src.checkpoints[g[-1]])
    return Source(src.model, ckpts, segs, src.train, task=src.task, strategy=src.strategy, batch_size=src.batch_size)


def _mean_lambda_scale(an: hw.Attributor, scale: float) -> dict[str, float]:
    return {n: scale * float(op.lam.mean()) for n, op in an.curvature.items() if isinstance(op, EigenCurvature)}


def run_setting(s: Setting, args: argparse.Namespace, log: Callable[[str], None]) -> list[str]:
    t_setting = time.perf_counter()
    train = s.train
    tmp = Path(tempfile.mkdtemp(prefix="hw-training-aware-"))
    t = time.perf_counter()
    model = s.fit(None, 0, record=tmp / "record")
    t_train = time.perf_counter() - t
    subsets = sample_subsets(len(train), args.subsets, 0.5, 0)
    t = time.perf_counter()
    tag = {"setting": s.name, "stages": [[len(st.data), st.steps, st.lr] for st in s.stages], "v": 1}
    retrain = lambda subset, seed: query_measurements(s.fit(subset, seed), s.task, s.queries)  # noqa: E731
    y = retrain_measurements(retrain, subsets, args.retrain_seeds, Path(args.cache) / s.name, tag=tag)
    t_retrain = time.perf_counter() - t
    score = lambda values: lds(values, subsets, y).mean  # noqa: E731
    rows: list[tuple[str, float, float, str]] = []  # label, LDS, seconds, passes

    def add(label: str, values: torch.Tensor, seconds: float, cost: str) -> None:
        rows.append((label, score(values), seconds, cost))
        log(f"  {label}: LDS {rows[-1][1]:.3f} ({seconds:.2f} s; {cost})")

    bs = 64
    an = hw.Attributor(model, task=s.task, strategy="ekfac")
    an.fit(train, bs)  # once to warm up; the second one is timed
    t = time.perf_counter()
    an.fit(train, bs, overwrite=True)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    add(
        "influence, EK-FAC, paper damping (0.1 x mean Lambda)",
        an.scores(s.queries, train, bs).values,
        t_fit + time.perf_counter() - t,
        "1 fit + 1 scoring pass",
    )
    sweep = {}
    default = an.damping
    for scale in SCALES:
        an.damping = lambda d=None, scale=scale: _mean_lambda_scale(an, scale)
        sweep[scale] = score(an.scores(s.queries, train, bs).values)
    an.damping = default
    best = max(sweep, key=sweep.get)
    rows.append((f"influence, best damping of the sweep (x {best:g} mean Lambda; peeks at LDS)", sweep[best], 0.0, "-"))
    log(f"  sweep: {sweep}")

    total_lr = sum(st.lr * st.steps for st in s.stages)
    t = time.perf_counter()
    unrolled = Unrolled(total_lr, 1.0, s.weight_decay)
    add(
        "Unrolled, SGD form (true lr x steps, weight decay)",
        an.scores(s.queries, train, bs, damping=1e-12, response=unrolled).values,
        t_fit + time.perf_counter() - t,
        "1 fit + 1 scoring pass",
    )

    indices = {f"stage{k}": st.data for k, st in enumerate(s.stages)}
    full = source_from_training(tmp / "record", train, indices=indices, model=s.model(0), task=s.task, batch_size=bs)
    n = len(full.segments)
    groupings = {1: [list(range(n))]}
    if len(s.stages) == 1:
        groupings[3] = [[0, 1], [2, 3], [4, 5]]
    else:  # 4 + 2 recorded: 2 + 1
        groupings[3] = [[0, 1], [2, 3], [4, 5]]
    groupings[6] = [[i] for i in range(n)]
    for k, groups in groupings.items():
        src = full if k == n and len(groups) == n else merge(full, groups)
        t = time.perf_counter()
        values = src.scores(s.queries).values
        c = src.cost
        add(
            f"SOURCE, {k} segment{'s' if k > 1 else ''}",
            values,
            time.perf_counter() - t,
            f"{k} fits ({c['fit_passes']} passes) + {c['scoring_passes']} scoring passes",
        )
    if not args.no_dense:
        for k in (1, 6):
            t = time.perf_counter()
            values = dense_source(merge(full, groupings[k]), s)
            add(
                f"reference: SOURCE, {k} segment{'s' if k > 1 else ''}, dense exact Gauss-Newton (no EK-FAC)",
                values,
                time.perf_counter() - t,
                "dense [P, P] per segment",
            )
        t = time.perf_counter()
        values = dense_source(merge(full, groupings[1]), s, horizon=float("inf"))
        add(
            "reference: influence, dense exact Gauss-Newton at damping = weight decay",
            values,
            time.perf_counter() - t,
            "dense [P, P]",
        )
    t = time.perf_counter()
    tr6 = merge(full, groupings[6])
    add(
        "TracIn-CP, 6 checkpoints (lr x gradient dot products)",
        tr6.tracin(s.queries).values,
        time.perf_counter() - t,
        "6 query + 6 scoring passes",
    )
    t = time.perf_counter()
    ens = merge(full, groupings[6])
    add(
        "ensemble of EK-FAC influence over the 6 checkpoints",
        ens.tracin(s.queries, curvature="ekfac").values,
        time.perf_counter() - t,
        "6 fits + 6 scoring passes",
    )

    t = time.perf_counter()
    cal = calibrate_damping(an, train, batch_size=bs, seed=0)
    t_cal = time.perf_counter() - t
    an.damping = lambda d=None: dict(cal.damping)
    add(
        f"calibrate_damping (chose x {cal.scale:g} mean Lambda), then influence",
        an.scores(s.queries, train, bs).values,
        t_fit + t_cal,
        f"1 fit + calibration: {cal.cost_fits:.0f} fits of example gradients, {t_cal / t_fit:.0f} of wall time",
    )
    an.damping = default
    if kronfluence_available():
        from headwater.evaluate.methods import kronfluence_scores
        from headwater.evaluate.trainers import Benchmark

        bench = Benchmark(s.name, model, s.task, train, s.queries, retrain, None, bs)
        t = time.perf_counter()
        add(
            "kronfluence EK-FAC, its 0.1 x mean Lambda",
            kronfluence_scores(bench, [None], 0)[0].double(),
            time.perf_counter() - t,
            "1 fit + 1 scoring pass",
        )
    else:
        rows.append(("kronfluence EK-FAC", float("nan"), 0.0, "not installed (scripts/install_peers.sh): skipped"))

    head = (
        f"### {s.name}\n\n{len(train)} training examples, {len(s.queries)} queries; stages "
        + ", ".join(f"{len(st.data)} examples x {st.steps} steps at lr {st.lr:g}" for st in s.stages)
        + f"; weight decay {s.weight_decay:g}. LDS over {args.subsets} half subsets x {args.retrain_seeds} "
        f"retraining seeds (retraining {t_retrain:.0f} s; one training run {t_train:.2f} s; one EK-FAC fit "
        f"{t_fit:.2f} s). Damping sweep (LDS per scale x mean Lambda): "
        + ", ".join(f"{k:g}: {v:.3f}" for k, v in sweep.items())
        + ". Calibration curve (local LDS per scale): "
        + ", ".join(f"{p['scale']:g}: {p['local_lds']:.3f}" for p in cal.curve)
        + f". Setting wall time {time.perf_counter() - t_setting:.0f} s.\n"
    )
    table = ["| method | LDS | seconds | cost |", "|---|---|---|---|"]
    for label, value, secs, cost in rows:
        shown = "n/a" if value != value else f"{value:.3f}"
        table.append(f"| {label} | {shown} | {secs:.2f} | {cost} |")
    return [head, *table, ""]


def dense_source(src: Source, s: Setting, horizon: float | None = None) -> torch.Tensor:
    """SOURCE with the dense Gauss-Newton over all parameters (cross-layer blocks included) and exact
    matrix exponentials of the non-symmetric P H: the linearised-training model without EK-FAC's
    approximations. ``horizon=inf`` gives the converged response H^-1 (influence at damping = weight decay)."""
    an = hw.Attributor(src.model, task=s.task, strategy="identity")
    last = len(src.segments) - 1
    model = src.load(last)
    space = ParameterSpace(model, an.layers)
    v = space.flatten(layer_gradients(model, s.task, an.layers, s.queries, 64, True)).double()  # [Q, P]
    eye = torch.eye(space.size, dtype=torch.float64)
    total = torch.zeros(len(s.queries), len(src.train), dtype=torch.float64)
    for i in range(last, -1, -1):
        model = src.load(i) if i != last else model
        seg, data = src.segments[i], src.segment_data(i)
        h = dense_gauss_newton(model, s.task, space, data, 64) + s.weight_decay * eye
        pre = AdamPreconditioner.from_parameters(model, an.layers, seg.second_moments, seg.eps)
        p = space.flatten({n: pre.scale(n) for n in an.layers}).double()
        if horizon == float("inf"):
            decay, response = torch.zeros_like(eye), torch.linalg.inv(h)
        else:
            decay = torch.linalg.matrix_exp(-seg.lr * seg.steps * p[:, None] * h)
            response = (eye - decay) @ torch.linalg.inv(h)
        g = space.flatten(layer_gradients(model, s.task, an.layers, data, 64)).double()
        total[:, src.columns(i)] += v @ response @ g.T
        v = v @ decay
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,regression")
    p.add_argument("--settings", default="early,two-stage,converged")
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--retrain-seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/training_aware")
    p.add_argument("--no-dense", action="store_true", help="skip the dense exact-GN reference rows")
    p.add_argument("--out", default="benchmarks/results/training_aware.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/training_aware.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    out = ["## Training-aware attribution", "", f"Command: `{command}`", ""]
    log = lambda line: print(line, flush=True)  # noqa: E731
    for task in [t for t in args.tasks.split(",") if t]:
        for setting in [x for x in args.settings.split(",") if x]:
            s = make_setting(task, setting)
            log(f"{s.name}")
            out += run_setting(s, args, log)
    out.append(f"Total {(time.perf_counter() - t0) / 60:.1f} min, {args.threads} thread(s).")
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
