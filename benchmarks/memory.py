"""Memory: headwater's peak per phase as a ratio to a plain training step on the same batch.

Each phase runs in its own process, so one phase's high-water mark cannot hide another's::

    python benchmarks/memory.py                          # GPT-2 arch, 6 layers, d=384, 256 tokens, batch 8 (CPU)
    python benchmarks/memory.py --device cuda --dtype bf16 --layers 12 --d 768 --tokens 512
    python benchmarks/memory.py --device cuda --dtype bf16 --arch llama --layers 22 --d 2048 --tokens 512

Phases (one child process each, for MLP-only and for all layers):

- ``plain``: a training step without the optimizer: forward, summed cross-entropy, ``loss.backward()``
  into ``.grad``. The reference: what a user who can train on this batch already affords.
- ``fit``: ``Attributor.fit`` (covariance pass, eigendecompositions, eigenvalue-correction pass),
  over the loaded model: this includes the factors it produces (fp64, O^2 + I^2 per layer).
- ``score``: ``Attributor.scores`` (query-gradient pass and scoring pass, query rank 32), over
  the model and the fitted factors (a fit in the same process before the reset).
- ``cov-pass``, ``lambda-pass``, ``score-pass``: one pass over the training data each, over the
  state it needs (the preallocated covariance sums; the fitted eigenbases; the factors and the
  query gradients): what the capture and its consumers cost on top of a forward and backward.
  These are the figures that streaming capture bounds; the whole phases add the factors.

What is measured is the peak *growth* over that starting point: on CPU the child's peak RSS as
``os.wait4`` reports it, after the child reset its
high-water mark (``/proc/self/clear_refs``) once the model was loaded; with ``--device cuda``
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU the children run
with a fixed malloc mmap threshold, so freed tensors go back to the OS and RSS follows the
live tensors in every phase alike.

"All layers" are every supported layer in the transformer blocks; the output head (tied to the
embedding in GPT-2, and a 50k-wide layer whose factor alone would be 20 GB) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

PHASES = ("plain", "fit", "score", "cov-pass", "lambda-pass", "score-pass")
MODULES = ("mlp", "all")


# ---- the child: one phase in a fresh process ---------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return 0.0


def _hwm_mb() -> float:
    """This process's peak RSS since the last reset (VmHWM), for a cross-check of wait4's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 0.0


def _reset_peak(device: str) -> float:
    """Release what the allocator holds, reset the high-water mark, and return the baseline (MB)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # glibc keeps freed small chunks; give them back so the baseline is the live memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (and so the ru_maxrss the parent reads) to the current RSS
    except OSError:  # pragma: no cover - not Linux: the growth then includes loading
        pass
    return _rss_mb()


def _current(device: str) -> float:
    """Live memory now, after releasing what the allocator caches (MB)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    return _rss_mb()


def _peak(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _hwm_mb()


def build(args: argparse.Namespace):
    """A randomly initialized GPT-2 or Llama of the given size, and ``batches * batch_size`` random sequences."""
    import torch

    torch.manual_seed(0)
    if args.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=args.vocab,
            n_positions=max(args.tokens, 128),
            n_embd=args.d,
            n_layer=args.layers,
            n_head=max(1, args.d // 64),
            bos_token_id=0,
            eos_token_id=0,
        )
        with torch.device(args.device):  # built where it runs: a 1B model's init is slow on the CPU
            model = GPT2LMHeadModel(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = max(1, args.d // 64)
        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.d,
            intermediate_size=args.ffn or int(2.75 * args.d) // 64 * 64,  # TinyLlama: 5632 at d=2048
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 8),
            max_position_embeddings=max(args.tokens, 128),
            tie_word_embeddings=False,
        )
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    n = args.batches * args.batch_size
    train = [{"input_ids": torch.randint(0, args.vocab, (args.tokens,), generator=g)} for _ in range(n)]
    queries = []
    for _ in range(args.queries):
        ids = torch.randint(0, args.vocab, (max(4, args.tokens // 4),), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        queries.append({"input_ids": ids, "labels": labels})
    return model, train, queries


def tracked(model, which: str) -> str | list[str]:
    """ "mlp", or every supported layer inside the transformer blocks (not the output head)."""
    if which == "mlp":
        return "mlp"
    from headwater.layers import supported_layers

    return [n for n in supported_layers(model) if ".h." in n or ".layers." in n]


def child(args: argparse.Namespace) -> None:
    """Run one phase and print its measurements as one JSON line (peak RSS comes from the parent)."""
    import torch

    torch.set_num_threads(args.threads)
    import headwater as hw
    from headwater.curvature.accumulators import CovarianceAccumulator, LambdaAccumulator
    from headwater.scoring import ScoreAccumulator

    model, train, queries = build(args)
    task = hw.LanguageModelingTask()
    out: dict[str, float] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    bs, phase = args.batch_size, args.child
    # A short warm-up step, so that one-time costs (kernels, thread pools, allocator arenas) sit in
    # every phase's baseline alike and not in whichever phase happens to run a backward first.
    warm = task.to_device(task.collate([{"input_ids": train[0]["input_ids"][:16]}]), args.device)
    task.loss(model, warm).backward()
    model.zero_grad(set_to_none=True)
    if phase == "plain":
        base = _reset_peak(args.device)
        t = time.perf_counter()
        for lo in range(0, len(train), bs):
            batch = task.to_device(task.collate(train[lo : lo + bs]), args.device)
            task.loss(model, batch).backward()
    else:
        an = hw.Attributor(model, task=task, modules=tracked(model, args.modules), strategy="ekfac")
        if phase == "cov-pass":  # the covariance pass alone, its (preallocated) sums in the baseline
            acc = CovarianceAccumulator(an.shapes, an.device)
            base = _reset_peak(args.device)
            t = time.perf_counter()
            an.run(train, acc, an.fit_losses, "covariance", bs)
        elif phase == "fit":
            base = _reset_peak(args.device)
            t = time.perf_counter()
            an.fit(train, batch_size=bs)
        else:
            an.fit(train, batch_size=bs)
            if phase == "lambda-pass":  # the eigenvalue-correction pass alone, over the fitted eigenbases
                acc = LambdaAccumulator(an.curvature, an.device)
                base = _reset_peak(args.device)
                t = time.perf_counter()
                an.run(train, acc, an.fit_losses, "eigenvalue correction", bs)
            elif phase == "score-pass":  # the training-data pass alone, over the factors and query gradients
                q = an.query_gradients(queries, bs, query_rank=args.rank)
                acc = ScoreAccumulator(q, len(train), False, False)
                base = _reset_peak(args.device)
                t = time.perf_counter()
                an.run(train, acc, an.training_loss, "scoring", bs)
            else:
                base = _reset_peak(args.device)
                t = time.perf_counter()
                an.scores(queries, train, batch_size=bs, query_rank=args.rank)
    out["seconds"] = time.perf_counter() - t
    out["peak_mb"] = _peak(args.device)
    out["base_mb"] = base
    out["retained_mb"] = _current(args.device) - base  # what the phase keeps: factors, their casts, .grad
    print("RESULT " + json.dumps(out), flush=True)


# ---- the parent: one child per phase, ratios to the plain step -----------------------------------


def run_child(args: argparse.Namespace, phase: str, modules: str) -> dict[str, float]:
    """Start one phase's process; on CPU its peak RSS is the ru_maxrss that ``os.wait4`` returns."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", phase, "--modules", modules]
    for key in ("arch", "layers", "d", "ffn", "tokens", "batch_size", "batches", "vocab", "queries", "rank"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    env = dict(os.environ)
    # A fixed threshold turns off glibc's sliding one: every tensor over 128 KiB is its own mapping,
    # returned to the OS when freed, so RSS tracks live tensors and not what the heap kept.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty stderr cannot block the child
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # reap it ourselves: Popen.wait would discard the rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"phase {phase} ({modules}) failed with status {proc.returncode}:\n{stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    res["wait4_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    if args.device.startswith("cuda"):
        res["growth_mb"] = res["peak_mb"] - res["base_mb"]
    else:
        res["growth_mb"] = res["wait4_mb"] - res["base_mb"]
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--ffn", type=int, default=0, help="Llama intermediate size (0: 2.75 d, as TinyLlama)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=1, help="batches per pass (the peak is per batch)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    p.add_argument("--modules", default="mlp,all", help="comma-separated: mlp, all")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of: " + ", ".join(PHASES))
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--child", default=None, choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        args.modules = args.modules.split(",")[0]
        child(args)
        return

    phases = [ph for ph in args.phases.split(",") if ph]
    modules = [m for m in args.modules.split(",") if m]
    print(f"# {platform.node()} {platform.machine()} {platform.processor()}, python {platform.python_version()}")
    print(f"# config: {vars(args)}")
    runs = [("plain", "mlp")] if "plain" in phases else []
    runs += [(ph, m) for m in modules for ph in phases if ph != "plain"]
    results: dict[str, dict[str, float]] = {}
    unit = "peak GPU memory growth (MB)" if args.device.startswith("cuda") else "peak RSS growth (MB)"
    for i, (phase, m) in enumerate(runs):  # rows as they come: a run cut short keeps what it measured
        key = "plain" if phase == "plain" else f"{phase}/{m}"
        r = results[key] = run_child(args, phase, m)
        if i == 0:
            print(f"# model: {r['params_m']:.1f}M parameters")
            print(f"\n| phase | layers | {unit} | ratio to plain step | retained after (MB) | time (s) |")
            print("|---|---|---|---|---|---|")
        base = results.get("plain", {}).get("growth_mb")
        ratio = f"{r['growth_mb'] / base:.2f}x" if base else "-"
        cells = [phase, "-" if phase == "plain" else m, f"{r['growth_mb']:,.0f}", ratio]
        cells += [f"{r['retained_mb']:,.0f}", f"{r['seconds']:.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
