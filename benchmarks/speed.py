"""Speed: headwater's fit and score time as ratios to a plain forward+backward pass.

Everything is measured in one process on one model and one dataset, so the ratios cancel
out the machine's speed. The default is the CPU configuration from the engine issue:

    python benchmarks/speed.py                      # GPT-2 arch, 4 layers, d=256, 128 tokens,
                                                    # 256 train seqs, 16 queries, vocab 8000
    python benchmarks/speed.py --device cuda --dtype bf16 --layers 12 --d 768 --tokens 512 --train 1024

"plain forward+backward" is a training step without the optimizer: forward, summed
cross-entropy, ``loss.backward()`` into ``.grad``. headwater's fit is its covariance pass +
eigendecompositions + eigenvalue-correction pass; its score is query gradients + one scoring
pass over the training data. kronfluence's EK-FAC is timed on the same model and data when
it is installed (``bash scripts/install_peers.sh``), with the same modules, batch size and
query rank.

``--compile`` adds the same three rows for ``torch.compile(model)`` (the plain pass compiled too,
after a warm-up that compiles every graph), as ratios to the eager plain pass. headwater's
capture hooks run between compiled regions (one graph break per tracked layer: a hook needs
the real output tensor to register its gradient hook), so the model compiles in pieces.

headwater runs with torch's ``opt_einsum`` path search switched off (``--opt-einsum off``, the
default), as on the default install, where the package is absent; kronfluence needs it and
gets it back for its own run.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import headwater as hw


def build(args):
    torch.manual_seed(0)
    if args.arch == "llama":
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
        with torch.device(args.device):  # a 1B model's init is slow on the CPU
            model = LlamaForCausalLM(cfg)
    else:
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
        with torch.device(args.device):
            model = GPT2LMHeadModel(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    train = [{"input_ids": torch.randint(0, args.vocab, (args.tokens,), generator=g)} for _ in range(args.train)]
    queries = []
    for _ in range(args.queries):
        ids = torch.randint(0, args.vocab, (args.tokens // 4,), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        queries.append({"input_ids": ids, "labels": labels})
    return model, train, queries


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark


def plain_forward_backward(model, train, batch_size: int, device: str) -> None:
    task = hw.LanguageModelingTask()
    for lo in range(0, len(train), batch_size):
        batch = task.to_device(task.collate(train[lo : lo + batch_size]), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
    model.zero_grad(set_to_none=True)


def autocast(args):
    if args.dtype == "bf16" and args.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_headwater(model, train, queries, args) -> dict:
    out = {}
    torch.backends.opt_einsum.enabled = args.opt_einsum == "on"
    an = hw.Attributor(model, modules="mlp", strategy="ekfac")
    with autocast(args):
        out["fit"], _ = timed(lambda: an.fit(train, batch_size=args.batch_size), args.device)
        out["fit_mem"] = peak_mb(args.device)
        out["score"], res = timed(
            lambda: an.scores(queries, train, batch_size=args.batch_size, query_rank=args.rank), args.device
        )
        out["score_mem"] = peak_mb(args.device)
        out["score_full"], _ = timed(lambda: an.scores(queries, train, batch_size=args.batch_size), args.device)
    out["values"] = res.values
    torch.backends.opt_einsum.enabled = True
    return out


def run_kronfluence(model, train, queries, args) -> dict | None:
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except Exception as e:  # not installed: the comparison is optional
        print(f"# kronfluence not available ({type(e).__name__}: {e}); skipping it", file=sys.stderr)
        return None
    import copy

    lm = hw.LanguageModelingTask()
    names = list(hw.Attributor(model, modules="mlp", strategy="identity").layers)

    class KfTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return lm.loss(model, batch, sample=sample)

        def compute_measurement(self, batch, model):
            return lm.measurement(model, batch)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Collated(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = [{k: v[0] for k, v in lm.collate([x]).items()} for x in items]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    from headwater.layers import conv1d_to_linear

    kmodel = prepare_model(conv1d_to_linear(copy.deepcopy(model)), KfTask())  # kronfluence lacks Conv1D
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("speed", kmodel, KfTask(), cpu=args.device == "cpu", disable_tqdm=True, output_dir=tmp)
        fargs = FactorArguments(strategy="ekfac")
        if args.dtype == "bf16":
            fargs.amp_dtype = torch.bfloat16
        out["fit"], _ = timed(
            lambda: analyzer.fit_all_factors(
                "f",
                Collated(train),
                per_device_batch_size=args.batch_size,
                factor_args=fargs,
                overwrite_output_dir=True,
            ),
            args.device,
        )
        out["fit_mem"] = peak_mb(args.device)
        sargs = ScoreArguments(query_gradient_low_rank=args.rank)
        if args.dtype == "bf16":
            sargs.amp_dtype = torch.bfloat16
        out["score"], scores = timed(
            lambda: analyzer.compute_pairwise_scores(
                "s",
                "f",
                Collated(queries),
                Collated(train),
                per_device_query_batch_size=args.queries,
                per_device_train_batch_size=args.batch_size,
                score_args=sargs,
                overwrite_output_dir=True,
            ),
            args.device,
        )
        out["score_mem"] = peak_mb(args.device)
        scores = scores if scores is not None else analyzer.load_pairwise_scores("s")
        out["values"] = scores["all_modules"].float().cpu()
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The model/data configuration, shared with the other benchmarks (engine issue's CPU config)."""
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--ffn", type=int, default=0, help="Llama intermediate size (0: 2.75 d, as TinyLlama)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2, help="plain passes; the fastest is the baseline")
    p.add_argument("--no-kronfluence", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model), plain and headwater")
    p.add_argument(
        "--opt-einsum", default="off", choices=["off", "on"], help="torch's einsum path search for headwater"
    )
    args = p.parse_args(argv)

    model, train, queries = build(args)
    n_tok = args.train * args.tokens
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# config: {vars(args)}")
    print(
        f"# opt_einsum installed: {torch.backends.opt_einsum.is_available()}; headwater runs with it {args.opt_einsum}"
    )
    plain_forward_backward(model, train[: args.batch_size], args.batch_size, args.device)  # warm-up
    base = min(
        timed(lambda: plain_forward_backward(model, train, args.batch_size, args.device), args.device)[0]
        for _ in range(args.repeats)
    )
    base_mem = peak_mb(args.device)
    print(f"\nplain forward+backward: {base:.2f} s ({n_tok / base:,.0f} tokens/s), peak {base_mem:,.0f} MB\n")
    mem_label = "peak GPU memory (MB)" if args.device.startswith("cuda") else "process peak RSS so far (MB)"
    print(f"| tool | phase | time (s) | ratio to fwd+bwd | tokens/s | {mem_label} |")
    print("|---|---|---|---|---|---|", flush=True)

    def row(tool: str, phase: str, t: float, mem: float) -> None:
        print(f"| {tool} | {phase} | {t:.2f} | {t / base:.2f}x | {n_tok / t:,.0f} | {mem:,.0f} |", flush=True)

    hw_res = run_headwater(model, train, queries, args)
    row("headwater", "fit (EK-FAC)", hw_res["fit"], hw_res["fit_mem"])
    row("headwater", f"score (rank {args.rank})", hw_res["score"], hw_res["score_mem"])
    row("headwater", "score (full rank)", hw_res["score_full"], float("nan"))
    if args.compile:
        # headwater's run first: a graph compiled without its hooks would not call them later
        # (torch.compile does not guard on hooks), and headwater refuses such a model
        compiled = torch.compile(model)
        warm = train[: 2 * args.batch_size]
        run_headwater(compiled, warm, queries[: args.batch_size], args)  # compiles the graphs between the hooks
        c_res = run_headwater(compiled, train, queries, args)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        plain_forward_backward(compiled, warm, args.batch_size, args.device)  # compiles
        t_c = timed(lambda: plain_forward_backward(compiled, train, args.batch_size, args.device), args.device)[0]
        row("plain (torch.compile)", "forward+backward", t_c, peak_mb(args.device))
        row("headwater (torch.compile)", "fit (EK-FAC)", c_res["fit"], c_res["fit_mem"])
        row("headwater (torch.compile)", f"score (rank {args.rank})", c_res["score"], c_res["score_mem"])
        row("headwater (torch.compile)", "score (full rank)", c_res["score_full"], float("nan"))
        a, b = hw_res["values"].float().flatten(), c_res["values"].float().flatten()
        print(f"\ncompiled vs eager scores: max relative difference {float((a - b).abs().max() / a.abs().max()):.1e}")
    kf = None if args.no_kronfluence else run_kronfluence(model, train, queries, args)
    if kf is not None:
        row("kronfluence 1.0.1", "fit (EK-FAC)", kf["fit"], kf["fit_mem"])
        row("kronfluence 1.0.1", f"score (rank {args.rank})", kf["score"], kf["score_mem"])
        a, b = hw_res["values"].float().flatten(), kf["values"].flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        print(
            f"\nheadwater vs kronfluence: fit {kf['fit'] / hw_res['fit']:.2f}x faster, "
            f"score {kf['score'] / hw_res['score']:.2f}x faster; score correlation {corr:.3f}"
        )


if __name__ == "__main__":
    main()
