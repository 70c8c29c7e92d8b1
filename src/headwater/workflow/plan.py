"""``headwater plan``: what a fit (and a scoring run) on these files will need, before running it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..io import InputError
from .common import Log, make_task, parse_modules

__all__ = ["plan_files", "parse_size"]


def parse_size(text: str | None) -> int | None:
    """'16GB', '512MiB', '2e9' -> bytes (GB and GiB both mean 2**30 here: memory is sold in those)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", text)
    if not m:
        raise InputError(f"--memory {text!r} is not a size; write e.g. 16GB, 512MB or 2e9")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def plan_files(
    model: str | Path,
    data: str | Path,
    *,
    tokenizer: str | Path | None = None,
    task: str = "causal-lm",
    modules: str = "mlp",
    strategy: str = "ekfac",
    max_length: int | None = None,
    batch_size: int = 8,
    queries: int = 0,
    query_rank: int | None = 32,
    per_token: bool = False,
    index_dim: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    memory: str | None = None,
    log: Log = print,
) -> Any:
    """``headwater.plan``'s estimate for ``headwater fit`` on these files (one batch is probed, nothing written)."""
    import headwater as hw

    from ..io import context_length, load_model, load_tokenizer, read_documents

    docs = read_documents(Path(data), task)
    net = load_model(Path(model), device=device, dtype=dtype, task=task)
    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else Path(model))
    an = hw.Attributor(
        net,
        task=make_task(task, tok, max_length or context_length(net)),
        strategy=strategy,
        modules=parse_modules(modules),
    )
    plan = an.plan(
        docs, batch_size=batch_size, queries=queries, query_rank=query_rank, per_token=per_token, index_dim=index_dim
    )
    log(plan.table())
    budget = parse_size(memory)
    if budget is not None:
        best = plan.max_batch_size(budget)
        log(
            f"the largest batch size within {memory}: {best}"
            if best
            else f"nothing fits in {memory}: the model and the fixed costs alone need {plan.peak(0) / 2**30:.1f} GiB"
        )
    return plan
