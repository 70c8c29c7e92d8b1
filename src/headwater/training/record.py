"""Record a training run as it happens, so SOURCE can run afterwards with nothing typed by hand.

    rec = TrainingRecorder("runs/record", model, optimizer, segments=6, total_steps=3000, data=train)
    for batch in loader:                     # your loop, unchanged
        loss(batch).backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
    rec.close()                              # the last segment ends at the final weights
    src = source_from_training("runs/record", train, task=...)   # a headwater.training.Source
    scores = src.scores(queries)

The recorder hooks the optimizer's ``step`` (``register_step_pre_hook``/``_post_hook``), so it sees
the learning rate every step actually used, whatever the scheduler does. At each segment's end it
writes, atomically (``headwater.storage``: safetensors for tensors, checksummed JSON for the rest,
nothing pickled)::

    DIR/run.json                           stages, segments, optimizer settings, schedule, data identity
    DIR/config.json                        the HF model config (when the model has one)
    DIR/segment-0003/model.safetensors     the weights at the segment's end
    DIR/segment-0003/second_moments.safetensors   Adam's bias-corrected exp_avg_sq per parameter

A second run on the same directory (fine-tuning after pretraining) adds a *stage*: its segments
train on that stage's data, so a sequence scores only in the stages whose data contained it.
``headwater.integrations.HeadwaterCallback`` does the same inside a ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..data import Subset, check_data, fingerprint
from ..storage import SCHEMA_VERSION, atomic_write_text, load_json, load_tensors, save_json, save_tensors
from ..validation import check_int, check_number
from .source import OPTIMIZERS, Segment, Source

__all__ = ["TrainingRecorder", "read_record", "source_from_training", "optimizer_kind", "RECORD_KIND"]

RECORD_KIND = "headwater-training-record"
RUN_FILE = "run.json"


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, dict]:
    """("sgd" | "adam" | "adamw", settings) of a torch optimizer; anything else is refused."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam in recent torch
        decoupled = isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        if group.get("amsgrad"):
            raise ValueError("AMSGrad keeps a running max of v, which SOURCE does not model; train with amsgrad=False")
        return ("adamw" if decoupled else "adam"), {"betas": list(group["betas"]), "eps": float(group["eps"])}
    if isinstance(opt, torch.optim.SGD):
        return "sgd", {"momentum": float(group.get("momentum", 0.0)), "nesterov": bool(group.get("nesterov", False))}
    raise TypeError(
        f"optimizer {type(opt).__name__} is not modelled: SOURCE's linearised step covers SGD (with momentum), "
        "Adam and AdamW; record with one of those"
    )


def _module_path(model: nn.Module) -> dict:
    cls = type(model)
    return {"class": cls.__name__, "module": cls.__module__, "dtype": str(next(model.parameters()).dtype)}


class TrainingRecorder:
    """Writes a training run's segments to ``directory`` from hooks on the optimizer.

    Parameters
    ----------
    directory : where the record goes (created; an existing record gets a new stage).
    model, optimizer : the model being trained and its torch optimizer (SGD, Adam or AdamW).
    every : close a segment every this many optimizer steps; or
    segments, total_steps : that many equal segments over ``total_steps``; or
    boundaries : the step counts at which segments end (the last segment ends at ``close``).
    data : the stage's training set, fingerprinted so ``source_from_training`` can check it.
    stage : this stage's name ("pretrain", "finetune", ...).
    loss_scale : the training loss over the mean per-example loss: a float, or "token" for a
        token-mean language-model loss (see ``Segment.loss_scale``).
    batch_size : the training batch size (recorded for the estimate of Adam's moments).
    """

    def __init__(
        self,
        directory: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        every: int | None = None,
        segments: int | None = None,
        total_steps: int | None = None,
        boundaries: Sequence[int] | None = None,
        data: Any = None,
        stage: str | None = None,
        loss_scale: float | str = 1.0,
        batch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.directory = Path(directory)
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self.kind, self.settings = optimizer_kind(self.optimizer)
        self.boundaries = _boundaries(every, segments, total_steps, boundaries)
        self.every = check_int(every, "every", allow_none=True)
        if isinstance(loss_scale, str):
            if loss_scale != "token":
                raise ValueError(f"loss_scale={loss_scale!r}: give a number or 'token'")
        else:
            loss_scale = check_number(loss_scale, "loss_scale", low=0.0, low_inclusive=False)
        self.record = self._open(stage, data, loss_scale, check_int(batch_size, "batch_size", allow_none=True))
        self.stage = self.record["stages"][-1]["name"]
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.steps = 0  # optimizer steps in this stage
        self.start = 0  # the step at which the open segment began
        self._lrs: list[list[float]] = []  # per step of the open segment: each group's lr
        self._closed = False
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
        ]

    # ------------------------------------------------------------------ hooks
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._lrs.append([float(g["lr"]) for g in self.optimizer.param_groups])

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self._due(self.steps):
            self._close_segment()

    def _due(self, step: int) -> bool:
        if self.every is not None:
            return step % self.every == 0
        return self.boundaries is not None and step in self.boundaries

    # ------------------------------------------------------------------ files
    def _open(self, stage: str | None, data: Any, loss_scale: float | str, batch_size: int | None) -> dict:
        path = self.directory / RUN_FILE
        if path.exists():
            record = read_record(self.directory)
        else:
            record = {
                "schema": SCHEMA_VERSION,
                "kind": RECORD_KIND,
                "headwater": __version__,
                "model": _module_path(self.model),
                "stages": [],
                "segments": [],
            }
            config = getattr(self.model, "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                atomic_write_text(self.directory / "config.json", config.to_json_string())
        names = [s["name"] for s in record["stages"]]
        stage = stage or f"stage{len(names)}"
        if stage in names:
            raise ValueError(
                f"stage {stage!r} is already recorded in {self.directory}; give this run another stage name "
                "(e.g. stage='finetune') or record into a new directory"
            )
        entry: dict[str, Any] = {"name": stage, "loss_scale": loss_scale, "batch_size": batch_size}
        if data is not None:
            data = check_data(data, "data")
            entry["data"] = {"size": len(data), "fingerprint": fingerprint(data)}
        else:
            entry["data"] = None
        record["stages"].append(entry)
        save_json(path, record)
        return record

    def _close_segment(self) -> None:
        steps = self.steps - self.start
        if steps <= 0:
            return
        index = len(self.record["segments"])
        folder = f"segment-{index:04d}"
        state = {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}
        save_tensors(self.directory / folder / "model.safetensors", state, {"step": self.steps, "stage": self.stage})
        lrs = torch.tensor(self._lrs, dtype=torch.float64)  # [steps, groups]
        groups = []
        for g, group in enumerate(self.optimizer.param_groups):
            groups.append(
                {
                    "params": [self.names[id(p)] for p in group["params"] if id(p) in self.names],
                    "lr_sum": float(lrs[:, g].sum()),
                    "weight_decay": float(group.get("weight_decay", 0.0)),
                }
            )
        meta = {
            "index": index,
            "stage": self.stage,
            "checkpoint": folder,
            "start_step": self.start,
            "end_step": self.steps,
            "steps": steps,
            "optimizer": self.kind,
            **self.settings,
            "groups": groups,
            "lrs": lrs[:, 0].tolist(),
        }
        if self.kind in ("adam", "adamw"):
            save_tensors(
                self.directory / folder / "second_moments.safetensors", self._second_moments(), {"step": self.steps}
            )
        self.record["segments"].append(meta)
        save_json(self.directory / RUN_FILE, self.record)
        self.start, self._lrs = self.steps, []

    def _second_moments(self) -> dict[str, torch.Tensor]:
        """Adam's exp_avg_sq per parameter name, bias-corrected with each parameter's own step count."""
        out = {}
        for group in self.optimizer.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if id(p) in self.names and "exp_avg_sq" in state and float(state["step"]) > 0:
                    out[self.names[id(p)]] = state["exp_avg_sq"].detach().cpu() / (1 - beta2 ** float(state["step"]))
        return out

    def close(self) -> None:
        """End the last segment at the current (final) weights and remove the hooks."""
        if self._closed:
            return
        self._close_segment()
        for h in self._handles:
            h.remove()
        self._closed = True

    def __enter__(self) -> TrainingRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _boundaries(
    every: int | None, segments: int | None, total_steps: int | None, boundaries: Sequence[int] | None
) -> list[int] | None:
    given = sum(x is not None for x in (every, segments, boundaries))
    if given > 1:
        raise ValueError("give one of every=, segments= (with total_steps=) or boundaries=, not several")
    if segments is not None:
        segments = check_int(segments, "segments")
        total_steps = check_int(total_steps, "total_steps", allow_none=True)
        if total_steps is None:
            raise ValueError(f"segments={segments} needs total_steps= (how many optimizer steps the run takes)")
        return sorted({round(total_steps * (k + 1) / segments) for k in range(segments - 1)} - {0})
    if boundaries is not None:
        out = sorted({check_int(int(b), "boundaries") for b in boundaries})
        return out
    return None


def read_record(directory: str | Path) -> dict:
    """The checked ``run.json`` of a record directory."""
    path = Path(directory) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} holds no training record ({RUN_FILE}); record one with TrainingRecorder or "
            "headwater.integrations.HeadwaterCallback"
        )
    record = load_json(path, hint="record the training run again")
    if record.get("kind") != RECORD_KIND:
        raise ValueError(f"{path} is not a headwater training record (kind {record.get('kind')!r})")
    return record


class _Concat:
    """Datasets one after the other, sized and indexable (the stages' data in stage order)."""

    def __init__(self, parts: list[Any]):
        self.parts, self.offsets = parts, []
        total = 0
        for p in parts:
            self.offsets.append(total)
            total += len(p)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.total:
            raise IndexError(i)
        k = max(j for j, off in enumerate(self.offsets) if off <= i)
        return self.parts[k][i - self.offsets[k]]


def _load_model(directory: Path, record: dict) -> nn.Module:
    """Rebuild the recorded model class from its saved HF config (no network)."""
    info = record["model"]
    if not (directory / "config.json").exists():
        raise ValueError(
            f"{directory} records a {info['class']} without a HF config, so it cannot be rebuilt; pass model= "
            "(an instance of the architecture) to source_from_training"
        )
    from transformers import AutoConfig

    cls = getattr(importlib.import_module(info["module"]), info["class"])
    config = AutoConfig.from_pretrained(str(directory))
    model = cls(config)
    return model.to(getattr(torch, info["dtype"].removeprefix("torch."))).eval()


def source_from_training(
    directory: str | Path,
    data: Any,
    model: nn.Module | None = None,
    stages: Sequence[str] | None = None,
    indices: Mapping[str, Sequence[int]] | None = None,
    check_data_fingerprint: bool = True,
    **source_kwargs: Any,
) -> Source:
    """A ``Source`` from a record directory: checkpoints, schedule, optimizer and data per segment as recorded.

    data : the training data, one dataset per recorded stage (a mapping by stage name, or a list
        in stage order; one dataset for a one-stage record). Scores are over their concatenation.
    indices : instead, ``data`` is one dataset holding every stage's examples and ``indices`` maps
        each stage to the positions of its examples there; scores are then in ``data``'s order.
    model : the architecture; None rebuilds the recorded HF class from its saved config.
    stages : use only these stages (e.g. the fine-tuning stage alone).
    source_kwargs : ``Source``'s other options (task, modules, strategy, damping, batch_size, ...).
    """
    directory = Path(directory)
    record = read_record(directory)
    if not record["segments"]:
        raise ValueError(
            f"{directory} records no finished segment; call close() on the recorder at the end of training"
        )
    all_stages = [s["name"] for s in record["stages"] if any(g["stage"] == s["name"] for g in record["segments"])]
    chosen = list(stages) if stages is not None else all_stages
    unknown = [s for s in chosen if s not in all_stages]
    if unknown:
        raise ValueError(f"stages {unknown} are not in the record; it holds {all_stages}")
    if indices is not None:
        return _source_over(directory, record, chosen, data, indices, model, check_data_fingerprint, source_kwargs)
    if isinstance(data, Mapping):
        missing = [s for s in chosen if s not in data]
        if missing:
            raise ValueError(f"data has no dataset for stages {missing}; give one per stage: {chosen}")
        parts = [data[s] for s in chosen]
    elif (
        isinstance(data, (list, tuple))
        and len(chosen) > 1
        and len(data) == len(chosen)
        and all(hasattr(d, "__len__") and not isinstance(d, (dict, tuple)) for d in data)
    ):
        parts = list(data)
    elif len(chosen) == 1:
        parts = [data]
    else:
        raise ValueError(f"the record has {len(chosen)} stages {chosen}: give data as a mapping stage -> dataset")
    train = parts[0] if len(parts) == 1 else _Concat(parts)
    offsets = train.offsets if isinstance(train, _Concat) else [0]
    rows = {name: list(range(lo, lo + len(part))) for name, lo, part in zip(chosen, offsets, parts)}
    return _source_over(directory, record, chosen, train, rows, model, check_data_fingerprint, source_kwargs)


def _source_over(
    directory: Path,
    record: dict,
    chosen: list[str],
    train: Any,
    rows: Mapping[str, Sequence[int]],
    model: nn.Module | None,
    check: bool,
    source_kwargs: dict,
) -> Source:
    """The Source over ``train``, where stage s trained on ``train[rows[s]]`` (checked against the record)."""
    train = check_data(train, "data")
    missing = [s for s in chosen if s not in rows]
    if missing:
        raise ValueError(f"indices has no entry for stages {missing}; give the positions of each stage's examples")
    info = {s["name"]: s for s in record["stages"]}
    for name in chosen:
        idx = [int(i) for i in rows[name]]
        if not idx or min(idx) < 0 or max(idx) >= len(train):
            raise ValueError(f"indices[{name!r}] must be non-empty positions in data (0..{len(train) - 1})")
        saved = info[name]["data"]
        if check and saved is not None:
            got = {"size": len(idx), "fingerprint": fingerprint(Subset(train, idx))}
            if got != saved:
                raise ValueError(
                    f"the data for stage {name!r} is not what it trained on (recorded {saved}, given {got}); pass "
                    "the same dataset, or check_data_fingerprint=False if you changed it on purpose"
                )
    model = _load_model(directory, record) if model is None else model
    checkpoints, segments = [], []
    for seg in record["segments"]:
        if seg["stage"] not in chosen:
            continue
        segments.append(_segment(directory, seg, info[seg["stage"]], rows[seg["stage"]], len(train)))
        checkpoints.append(directory / seg["checkpoint"])
    return Source(model, checkpoints, segments, train, **source_kwargs)


def _segment(directory: Path, seg: dict, stage: dict, rows: Sequence[int], n: int) -> Segment:
    """A recorded segment as a ``Segment`` (per-parameter weight decay, Adam moments from disk)."""
    if seg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"segment {seg['index']}: optimizer {seg['optimizer']!r} is not one of {OPTIMIZERS}")
    lrs = {round(g["lr_sum"], 12) for g in seg["groups"] if g["params"]}
    if len(lrs) > 1:
        raise ValueError(
            f"segment {seg['index']} used different learning rates per parameter group {sorted(lrs)}; SOURCE takes "
            "one learning rate per segment"
        )
    lr_sum = lrs.pop()
    decay = {p: g["weight_decay"] for g in seg["groups"] for p in g["params"]}
    moments = None
    if seg["optimizer"] != "sgd":
        moments = load_tensors(directory / seg["checkpoint"] / "second_moments.safetensors", "Adam second moments")[0]
    return Segment(
        lr=lr_sum / seg["steps"],
        steps=seg["steps"],
        data=None if sorted(int(i) for i in rows) == list(range(n)) else [int(i) for i in rows],
        weight_decay=decay,
        optimizer=seg["optimizer"],
        momentum=seg.get("momentum", 0.0) if seg["optimizer"] == "sgd" else 0.0,
        second_moments=moments,
        eps=seg.get("eps", 1e-8),
        loss_scale=stage["loss_scale"],
        batch_size=stage.get("batch_size"),
        name=stage["name"],
    )
