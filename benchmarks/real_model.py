"""A real-sized model on the default install: GPT-2-small's shape on real local text, through the CLI's workflow.

    python benchmarks/real_model.py                      # 12 layers, d=768, 12k vocabulary, 48 x 256 tokens
    python benchmarks/real_model.py --layers 2 --d 128   # a quick check of the script itself

What a user gets from ``headwater fit`` and ``headwater score`` on such a model, measured as
they would run it: each stage in its own process (so its peak RSS is its own), the model and
tokenizer loaded from a local ``save_pretrained`` directory, and torch's ``opt_einsum`` off
(absent on the default install). The text is real and local: licence files and Python sources
found on this machine (the standard library and site-packages), cut into documents; a byte-level
BPE tokenizer is trained on them, and the model takes a few AdamW steps so that it is not uniform.

Reported per stage: wall time, peak RSS, and per pass of the engine's loop its time and tokens/s
(timed by wrapping ``headwater.attributor.run_pass``), plus the workdir's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

STAGE = r"""
import json, sys, time, torch
torch.backends.opt_einsum.enabled = False
import headwater.attributor as ha
from headwater.workflow import fit_workdir, score_workdir

passes, original = [], ha.run_pass
def timed(*args, **kw):
    data = args[3]
    t = time.perf_counter()
    out = original(*args, **kw)
    passes.append({"phase": kw["phase"], "seconds": time.perf_counter() - t, "examples": len(data)})
    return out
ha.run_pass = timed
cfg = json.loads(sys.argv[1])
t0 = time.perf_counter()
if cfg["stage"] == "fit":
    fit_workdir(cfg["model"], cfg["data"], cfg["workdir"], modules=cfg["modules"], batch_size=cfg["batch_size"],
                max_length=cfg["tokens"], progress=False, log=lambda m: print(m, file=sys.stderr))
else:
    score_workdir(cfg["workdir"], cfg["queries"], out=cfg["out"], per_token=cfg["per_token"], top_k=10,
                  progress=False, log=lambda m: print(m, file=sys.stderr))
print(json.dumps({"seconds": time.perf_counter() - t0, "passes": passes}))
"""


def corpus(n_docs: int, min_chars: int = 800) -> list[str]:
    """Real local text: licence files and Python sources, in a fixed order, cut to ~1-3 KB documents."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files = []
    for root in roots:
        files += sorted(p for p in root.rglob("LICENSE*") if p.is_file())
        files += sorted(p for p in root.glob("*/*.py") if p.is_file())
    rng = random.Random(0)
    rng.shuffle(files)
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            docs.append(text[: rng.randint(min_chars, 3 * min_chars)])
        if len(docs) >= n_docs:
            break
    return docs


def build(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path]:
    """Tokenizer, model (a few AdamW steps), train.jsonl and queries.jsonl under ``root``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    docs = corpus(args.train + 400)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=args.vocab,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=args.tokens, n_embd=args.d, n_layer=args.layers, n_head=max(1, args.d // 64)
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    enc = [tok(d, add_special_tokens=False)["input_ids"][: args.tokens] for d in docs[args.train :]]
    model.train()
    for step in range(args.train_steps):
        batch = [enc[(step * 8 + i) % len(enc)] for i in range(8)]
        s = min(len(x) for x in batch)
        ids = torch.tensor([x[:s] for x in batch])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[: args.train]))
    queries = root / "queries.jsonl"
    rows = []
    for d in docs[args.train : args.train + args.queries]:  # unseen text: prompt, then the next line
        lines = [x for x in d.splitlines() if x.strip()]
        rows.append({"prompt": "\n".join(lines[:3]) + "\n", "completion": lines[3] if len(lines) > 3 else " end"})
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", train, queries


def stage(cfg: dict) -> dict:
    """Run one stage in a fresh process; its result plus the process's peak RSS (wait4)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STAGE, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"stage {cfg['stage']} failed:\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    res["log"] = err.strip().splitlines()
    return res


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--vocab", type=int, default=12000)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--train", type=int, default=48)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--root", type=Path, default=Path("runs/real_model"))
    p.add_argument("--per-token", action="store_true", help="also score with --per-token ([Q, N, T] scores)")
    args = p.parse_args(argv)
    import torch

    args.root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, train, queries = build(args, args.root)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"opt_einsum installed: {torch.backends.opt_einsum.is_available()} (off in every stage)"
    )
    print(f"# config: {vars(args)}; built in {time.perf_counter() - t:.0f}s")
    wd = args.root / "wd"
    base = {
        "model": str(model),
        "data": str(train),
        "workdir": str(wd),
        "queries": str(queries),
        "modules": "mlp",
        "batch_size": args.batch_size,
        "tokens": args.tokens,
    }
    import shutil

    shutil.rmtree(wd, ignore_errors=True)
    runs = {"fit": stage({**base, "stage": "fit"})}
    runs["score"] = stage({**base, "stage": "score", "out": str(wd / "run"), "per_token": False})
    if args.per_token:
        runs["score --per-token"] = stage({**base, "stage": "score", "out": str(wd / "run-pt"), "per_token": True})
    n_tok = args.train * args.tokens  # documents are longer than --tokens, so each is cut to it
    print("\n| stage | wall (s) | peak RSS (MB) | passes: seconds (training tokens/s) |")
    print("|---|---|---|---|")
    for name, r in runs.items():
        parts = []
        for ps in r["passes"]:
            rate = f", {n_tok / ps['seconds']:,.0f} tok/s" if ps["examples"] == args.train else ""
            parts.append(f"{ps['phase']} {ps['seconds']:.1f}{rate}")
        other = r["seconds"] - sum(ps["seconds"] for ps in r["passes"])
        parts.append(f"other (loading, eigendecompositions, writing) {other:.1f}")
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {'; '.join(parts)} |")
    print(f"\nworkdir {wd}: {size(wd) / 2**20:,.1f} MiB on disk")
    for f in sorted(wd.iterdir()):
        print(f"  {f.name:<28} {(size(f) if f.is_dir() else f.stat().st_size) / 2**20:>10,.1f} MiB")
    fit_log = [x for x in runs["fit"]["log"] if "factors:" in x or "fitted in" in x]
    print("\n".join(f"# {x}" for x in fit_log))


if __name__ == "__main__":
    main()
