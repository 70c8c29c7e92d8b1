"""``headwater calibrate`` and ``headwater source``: the training-aware tools of ``headwater.training`` on files.

    headwater calibrate --workdir runs/a                    # damping from short fine-tuning runs -> calibration.json
    headwater score --workdir runs/a --queries q.jsonl --damping calibrate
    headwater source --from-training runs/record --data pretrain.jsonl --data finetune.jsonl \\
        --tokenizer runs/tok --queries q.jsonl --out runs/source

``source`` runs SOURCE (Bae et al. 2024) from a record written during training by
``headwater.integrations.HeadwaterCallback`` (or ``TrainingRecorder``): every checkpoint, learning
rate, step count and optimizer state comes from the record, none is typed by hand. It fits one
EK-FAC per segment in memory (nothing is cached between commands) and writes a run directory
like ``score`` does, without token heatmaps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..io import InputError
from .common import RESULTS_FILE, Log, make_task, now, parse_modules, reopen

__all__ = ["calibrate_workdir", "source_run"]


def calibrate_workdir(
    workdir: str | Path, *, data: str | Path | None = None, device: str | None = None, log: Log = print, **kw: Any
) -> Any:
    """``calibrate_damping`` for a fitted workdir's attributor and data; saved as ``calibration.json``."""
    from ..io import read_documents
    from ..training import calibrate_damping

    workdir = Path(workdir)
    r = reopen(workdir, device=device, progress=False)
    path = data or r.settings.get("data")
    if path is None:
        raise InputError(f"{workdir} records no data file; pass --data FILE")
    docs = read_documents(Path(path), r.settings.get("task", "causal-lm"))
    cal = calibrate_damping(r.attributor, docs, batch_size=r.settings.get("batch_size", 8), **kw)
    for point in cal.curve:
        mark = " <- chosen" if point["scale"] == cal.scale else ""
        log(f"  damping {point['scale']:g} x mean eigenvalue: local LDS {point['local_lds']}{mark}")
    log(
        f"calibrated damping scale {cal.scale:g} in {cal.seconds:.1f}s ({cal.cost_fits:.1f} fits' worth of "
        f"gradients); implied weight decay {cal.implied_weight_decay:.3g}; use --damping calibrate"
    )
    return cal


def source_run(
    record: str | Path,
    data: list[str | Path],
    queries: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path,
    task: str = "causal-lm",
    modules: str = "mlp",
    strategy: str = "ekfac",
    max_length: int | None = None,
    batch_size: int = 8,
    top_k: int = 20,
    log: Log = print,
) -> dict:
    """SOURCE scores of ``queries`` against the recorded stages' data; a run directory at ``out``."""
    from ..data import fingerprint
    from ..io import document_text, load_tokenizer, query_example, read_documents, read_queries
    from ..training import source_from_training
    from .outputs import render
    from .score import build_results, write_run

    out = Path(out)
    qs = read_queries(Path(queries), task)
    stages = [read_documents(Path(p), task) for p in data]
    tok = load_tokenizer(Path(tokenizer))
    src = source_from_training(
        Path(record),
        stages if len(stages) > 1 else stages[0],
        task=make_task(task, tok, max_length),
        modules=parse_modules(modules),
        strategy=strategy,
        batch_size=batch_size,
    )
    clean_q = [query_example(q, task) for q in qs]
    log(f"SOURCE over {len(src.segments)} segments of {record}: {len(qs)} queries ({src.cost})")
    t0 = time.perf_counter()
    sc = src.scores(clean_q, per_layer=True)
    seconds = time.perf_counter() - t0
    docs = [d for stage in stages for d in (stage[i] for i in range(len(stage)))]
    layers = list(sc.per_layer or {})
    k = min(top_k, sc.values.shape[1])

    def entry(q: int, i: int, score: float) -> dict:
        per_layer = {n: float(sc.per_layer[n][q, i]) for n in layers}
        return {"index": i, "score": score, "text": document_text(docs[i], tok), "per_layer": per_layer}

    results = build_results(qs, sc, k, layers, entry)
    run = {
        "title": f"headwater SOURCE report: {Path(record).name}",
        "created": now(),
        "record": str(Path(record).resolve()),
        "queries_file": str(Path(queries).resolve()),
        "data": [str(Path(p).resolve()) for p in data],
        "data_fingerprint": fingerprint(docs),
        "n_train": len(docs),
        "n_queries": len(qs),
        "top_k": k,
        "layers": layers,
        "strategy": f"SOURCE ({len(src.segments)} segments, {strategy})",
        "score_seconds": round(seconds, 2),
    }
    settings = {"strategy": run["strategy"], "model": str(record), "task": task, "modules": modules}
    run["fit"] = settings  # what `headwater report` shows (there is no workdir)
    write_run(out, sc, results, run, render(results, sc, settings, run, source=str(out / RESULTS_FILE)))
    log(f"scored in {seconds:.1f}s -> {out}/")
    return {"results": results, "out": out, "scores": sc, "run": run}
