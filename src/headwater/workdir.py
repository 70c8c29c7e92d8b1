"""The engine's workdir: which files it holds, what they must match, and what goes stale when.

    config.json               model fingerprint, task, strategy, fisher, seed, module set (checksummed)
    factors.safetensors       the fitted curvature; its checksum identifies the fit
    covariance.safetensors    K-FAC's covariance sums (kept only with keep_covariance=True)
    checkpoints/<pass>/       progress of an interrupted fit pass (removed when the pass ends)
    scores/<key>.safetensors  finished score runs, keyed by everything they depend on
    scores/<key>/             progress of an interrupted score run
    results/, index/          what the command line and the index derive from the factors

Every result derived from the factors (cached scores, results, the index) is removed when the
factors are refitted, so a workdir never holds a result computed from factors it no longer has.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .distributed import barrier, is_main
from .engine import Checkpoint, spec_key
from .storage import clean_leftovers, load_json, load_tensors, save_json, save_tensors, tensors_meta

__all__ = ["Workdir", "WorkdirMismatchError", "CONFIG_KEYS", "DERIVED"]

CONFIG_FILE = "config.json"
FACTORS_FILE = "factors.safetensors"
COVARIANCE_FILE = "covariance.safetensors"
CALIBRATION_FILE = "calibration.json"  # written by headwater.training.calibrate_damping
CHECKPOINTS = "checkpoints"
SCORES = "scores"
# What must match for a workdir to be reused, in the order a mismatch is reported.
CONFIG_KEYS = ("model", "task", "strategy", "fisher", "samples", "top", "seed", "modules")
# Config keys added after workdirs existed: a saved config without one was made with this value.
CONFIG_DEFAULTS = {"samples": 1, "top": None}
# Files and directories computed from the factors: stale after a refit.
DERIVED = (
    SCORES,
    "results",
    "index",
    "scores.safetensors",
    "results.jsonl",
    "report.html",
    "run.json",
    "analysis.json",
    CALIBRATION_FILE,
)
REFIT = "refit with overwrite=True (headwater fit --overwrite)"


class WorkdirMismatchError(ValueError):
    """The workdir was made for other settings: ``key`` differs (``saved`` there, ``wanted`` here)."""

    def __init__(self, message: str, key: str, saved: Any, wanted: Any):
        super().__init__(message)
        self.key, self.saved, self.wanted = key, saved, wanted


class Workdir:
    """One directory of engine artifacts (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- files ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def factors_path(self) -> Path:
        return self.path / FACTORS_FILE

    @property
    def covariance_path(self) -> Path:
        return self.path / COVARIANCE_FILE

    # ---- config --------------------------------------------------------------------------
    def open(self, config: dict) -> None:
        """Record ``config`` in a new workdir, or check that an existing one was made for it."""
        if is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.path)
            if not self.config_path.exists():
                save_json(self.config_path, config)
        barrier()  # other ranks read what rank 0 wrote
        saved = load_json(self.config_path, hint=f"delete {self.path} or use a new workdir")
        for key in CONFIG_KEYS:
            old = saved.get(key, CONFIG_DEFAULTS.get(key))
            if old != config[key]:
                raise WorkdirMismatchError(self._mismatch(key, saved.get(key), config[key]), key, old, config[key])

    def _mismatch(self, key: str, old: Any, new: Any) -> str:
        if key == "model":
            diff = "another model (its weights or architecture differ from this one's)"
        elif key == "task":
            diff = f"another task ({_short(old)}; this one is {_short(new)})"
        elif key == "modules":
            diff = f"another module set ({len(old or {})} layers: {_short_names(old)})"
        else:
            diff = f"{key}={old!r} (this Attributor has {key}={new!r})"
        return f"workdir {self.path} was made for {diff}; use a new workdir or delete this one"

    def replace_config(self, config: dict) -> None:
        if is_main():
            save_json(self.config_path, config)
        barrier()

    # ---- factors -------------------------------------------------------------------------
    def load_factors(self) -> tuple[dict, dict, str] | None:
        """(tensors, metadata, checksum) of the fitted factors, verified; None before a fit."""
        if not self.factors_path.exists():
            return None
        tensors, meta = load_tensors(self.factors_path, "factors", hint=f"{REFIT}, or use a new workdir")
        return tensors, meta, tensors_meta(self.factors_path)[1]

    def save_factors(self, tensors: dict, meta: dict) -> str | None:
        """Write the factors (rank 0) and drop every result derived from earlier ones."""
        checksum = None
        if is_main():
            self.clear_derived()
            checksum = save_tensors(self.factors_path, tensors, meta)
        barrier()
        return checksum if checksum is not None else tensors_meta(self.factors_path)[1]

    def record_fit(self, config: dict, tensors: dict, meta: dict, keep_covariance: bool = False) -> str | None:
        """After a fit: the settings, the factors (dropping derived results), then the covariance
        sums (unless kept) and leftovers removed; returns the factors' checksum."""
        self.replace_config(config)
        checksum = self.save_factors(tensors, meta)
        if not keep_covariance:
            self.drop_covariance()
        self.tidy()
        return checksum

    def load_covariance(self, spec: dict) -> dict | None:
        """Saved covariance sums for exactly this covariance pass (``spec``), or None."""
        if not self.covariance_path.exists():
            return None
        meta, _ = tensors_meta(self.covariance_path, hint=f"delete it, or {REFIT}")
        if meta.get("pass") != spec_key(spec):
            return None
        return load_tensors(self.covariance_path, "covariance sums", hint=f"delete it, or {REFIT}")[0]

    def save_covariance(self, tensors: dict, spec: dict) -> None:
        if is_main():
            save_tensors(self.covariance_path, tensors, {"pass": spec_key(spec), "spec": spec})

    def drop_covariance(self) -> int:
        """Remove the covariance sums once the factors are saved; returns the bytes freed."""
        size = self.covariance_path.stat().st_size if self.covariance_path.exists() else 0
        if is_main():
            self.covariance_path.unlink(missing_ok=True)
        return size

    # ---- checkpoints ---------------------------------------------------------------------
    def fit_checkpoint(self, phase: str, spec: dict, every: int | None, overwrite: bool) -> Checkpoint | None:
        """The checkpoint of one fit pass; another fit's partial pass is an error (or removed with ``overwrite``)."""
        if not every:
            return None
        slug = phase.replace(" ", "_")
        key = f"{slug}-{spec_key(spec)}"
        root = self.path / CHECKPOINTS
        for other in sorted(root.glob(f"{slug}-*")) if root.is_dir() else []:
            if other.name == key or not other.is_dir():
                continue
            if overwrite:
                if is_main():
                    shutil.rmtree(other, ignore_errors=True)
                continue
            old = _read_spec(other)
            diff = next((k for k in spec if old.get(k) != spec[k]), None)
            if diff is None:
                continue
            raise ValueError(
                f"{other} is a partial {phase} pass with {diff}={old.get(diff)!r}, but this fit has "
                f"{diff}={spec[diff]!r}; rerun with the original data and batch size, or pass overwrite=True"
            )
        ckpt = Checkpoint(root, key, every)
        if is_main() and not (ckpt.path / "spec.json").exists():
            save_json(ckpt.path / "spec.json", spec)
        barrier()
        return ckpt

    def score_checkpoint(self, key: str, every: int | None) -> Checkpoint | None:
        return Checkpoint(self.path / SCORES, key, every) if every else None

    def cached_scores(self, key: str) -> Path:
        return self.path / SCORES / f"{key}.safetensors"

    def calibrated_damping(self, factors: str | None, layers: list[str]) -> dict[str, float]:
        """The per-layer damping ``headwater.training.calibrate_damping`` saved here (``damping="calibrate"``).

        Refused when there is none, or when it was calibrated for other factors or layers.
        """
        path = self.path / CALIBRATION_FILE
        if not path.exists():
            raise ValueError(
                f'damping="calibrate" needs a calibration in the workdir {self.path}; run '
                "headwater.training.calibrate_damping(an, train) first"
            )
        saved = load_json(path, hint="delete it and recalibrate")
        damping = (saved.get("calibration") or {}).get("damping") or {}
        if saved.get("factors") != factors or set(damping) != set(layers):
            raise ValueError(
                f"{path} was calibrated for other factors or layers; rerun headwater.training.calibrate_damping"
            )
        return {n: float(damping[n]) for n in layers}

    # ---- staleness -----------------------------------------------------------------------
    def clear_derived(self) -> None:
        """Remove every result computed from the factors (scores cache, results, index)."""
        for name in DERIVED:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def tidy(self) -> None:
        """Remove empty checkpoint directories and dead writers' temporary files."""
        if not is_main():
            return
        clean_leftovers(self.path)
        root = self.path / CHECKPOINTS
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def _read_spec(directory: Path) -> dict:
    try:
        return load_json(directory / "spec.json")
    except (OSError, ValueError):
        return {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _short_names(names: Any) -> str:
    keys = list(names or {})
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
