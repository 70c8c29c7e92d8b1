"""Time and check every ``headwater.curvature.linalg.symmetric_eigh`` method at the K-FAC factor sizes of GPT-2 small.

    python benchmarks/eigh.py                       # 768,769,3072,3073; 3 repeats; 1 and 2 threads
    python benchmarks/eigh.py --sizes 256,257 --repeats 1 --methods float64,float32
    python benchmarks/eigh.py --contend 3072        # also time float64, scipy-evd at 3072 with the other core busy
    python benchmarks/eigh.py --methods float64 --end-to-end   # and all 48 GPT-2-small factors, 1 vs 2 workers

Odd sizes are layer-input factors A (a bias column, a mean offset, a 1/k spectrum: like
``c_fc``'s 769 and ``c_proj``'s 3073); even sizes are gradient factors S (zero mean, 1/k
spectrum). Each is X^T X / tokens from float64 random data. Accuracy is measured against the
float64 method: max |Q^T Q - I|, ||Q e Q^T - A||_F / ||A||_F, the relative error of the damped
inverse ``Q (e + d)^-1 Q^T v`` on 8 random vectors with d = 0.1 x mean eigenvalue, and the
eigenvalue error relative to the largest. "2 workers" rows run two matrices of the size
concurrently through ``symmetric_eigh_many`` (one thread each) and report the wall time per
matrix. ``--contend`` repeats the rows of ``--contend-methods`` at the given sizes while a busy loop
holds one core, to show what threads do on a shared machine. The projection is 12 x the sum of the
medians at 769, 3072, 3073 and 768 (GPT-2 small's 24 MLP layers, factors A and S each).

Every timing records the 1-minute load average just before it: on a shared machine the
figures move with what else runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from headwater.curvature.linalg import METHODS, symmetric_eigh, symmetric_eigh_many

GPT2_SMALL = (769, 3072, 3073, 768)  # per block: c_fc A, c_fc S, c_proj A, c_proj S
BLOCKS = 12


def factor(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A (odd n: bias column, mean offset 0.3) or S (even n: zero mean), both with a 1/k spectrum."""
    g = torch.Generator().manual_seed(seed + n)
    bias = n % 2 == 1
    d = n - 1 if bias else n
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
    x = (torch.randn(tokens, d, generator=g, dtype=torch.float64) * scale) @ rot.T
    if bias:
        x = torch.cat([x + 0.3, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return x.T @ x / tokens


def accuracy(a: torch.Tensor, e: torch.Tensor, q: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> dict:
    n = a.shape[0]
    e64, q64 = ref
    eye = torch.eye(n, dtype=torch.float64)
    v = torch.randn(n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = 0.1 * e64.clamp_min(0).mean()
    want = q64 @ ((q64.mT @ v) / (e64.clamp_min(0) + d)[:, None])
    got = q @ ((q.mT @ v) / (e.clamp_min(0) + d)[:, None])
    return {
        "orth": (q.mT @ q - eye).abs().max().item(),
        "recon": (torch.linalg.matrix_norm((q * e) @ q.mT - a) / torch.linalg.matrix_norm(a)).item(),
        "inv": (torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)).item(),
        "eig": ((e - e64).abs().max() / e64.abs().max()).item(),
        "kappa": (e64.max() / d + 1).item(),
    }


def load1() -> float:
    return os.getloadavg()[0]


def timed(fn, repeats: int) -> tuple[float, list[float], list[float], object]:
    """Median seconds, all seconds, the load average before each run, the last result."""
    secs, loads, out = [], [], None
    for _ in range(repeats):
        loads.append(load1())
        t = time.perf_counter()
        out = fn()
        secs.append(time.perf_counter() - t)
    return statistics.median(secs), secs, loads, out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_loop() -> subprocess.Popen:
    """One core's worth of load, standing in for another user's test run."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def fmt(x: float) -> str:
    return f"{x:.1e}"


def run_rows(args, sizes: list[int], methods: list[str], threads: list[int], workers: bool, label: str, mats, refs):
    rows = []
    for n in sizes:
        a, ref = mats[n], refs[n]
        for method in methods:
            for t in threads:
                med, secs, loads, (e, q) = timed(
                    lambda a=a, m=method, t=t: symmetric_eigh(a, method=m, threads=t), args.repeats
                )
                how = f"{t} thread{'s' * (t > 1)}"
                row = {"n": n, "method": method, "how": how, "cond": label, "sec": med, "all": secs, "load": loads}
                rows.append({**row, **accuracy(a, e, q, ref)})
                print(row_line(rows[-1]), flush=True)
            if workers and not method.startswith("scipy-"):
                b = a.clone()
                med, secs, loads, out = timed(
                    lambda a=a, b=b, m=method: symmetric_eigh_many([a, b], method=m, workers=2), args.repeats
                )
                e, q = out[0]
                row = {"n": n, "method": method, "how": "2 workers x 1 thread", "cond": label, "sec": med / 2}
                row |= {"all": [s / 2 for s in secs], "load": loads}
                rows.append({**row, **accuracy(a, e, q, ref)})
                print(row_line(rows[-1]), flush=True)
    return rows


HEADER = (
    "| n | method | threads | other core | median s | runs s | load before runs | max abs(Q^TQ-I) | recon rel F "
    "| damped inv rel err | eig err / max | kappa_d |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row_line(r: dict) -> str:
    runs = ", ".join(f"{s:.2f}" for s in r["all"])
    loads = ", ".join(f"{x:.2f}" for x in r["load"])
    return (
        f"| {r['n']} | {r['method']} | {r['how']} | {r['cond']} | {r['sec']:.3f} | {runs} | {loads} | {fmt(r['orth'])} "
        f"| {fmt(r['recon'])} | {fmt(r['inv'])} | {fmt(r['eig'])} | {fmt(r['kappa'])} |"
    )


def projection(rows: list[dict]) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["how"], r["cond"]), {})[r["n"]] = r["sec"]
    out = [
        "| method | threads | other core | per block s (769+3072+3073+768) | 24 MLP layers (12 blocks) s |",
        "|---|---|---|---|---|",
    ]
    for (method, how, cond), secs in by.items():
        if all(n in secs for n in GPT2_SMALL):
            block = sum(secs[n] for n in GPT2_SMALL)
            out.append(f"| {method} | {how} | {cond} | {block:.2f} | {BLOCKS * block:.1f} |")
    return out


def end_to_end(tokens: int, repeats: int) -> list[str]:
    """The 48 factors of GPT-2 small's MLP layers (12 copies of each size), float64.

    The two ways alternate within each repeat, so a change in the machine's load hits both.
    """
    base = {n: factor(n, tokens) for n in GPT2_SMALL}
    mats = [base[n].clone() for _ in range(BLOCKS) for n in GPT2_SMALL]
    ways = {
        "one by one, 1 thread (today)": lambda: [symmetric_eigh(m, method="float64") for m in mats],
        "symmetric_eigh_many, 2 workers x 1 thread": lambda: symmetric_eigh_many(mats, method="float64", workers=2),
    }
    secs: dict[str, list[float]] = {w: [] for w in ways}
    loads: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            loads[name].append(load1())
            t = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t)
            print(f"end to end: {name}: {secs[name][-1]:.1f} s (load before {loads[name][-1]:.2f})", flush=True)
    out = ["End to end, 48 factors (12 x 769, 3072, 3073, 768), float64, the two ways alternating:", ""]
    out += ["| way | median s | runs s | load before runs |", "|---|---|---|---|"]
    for name in ways:
        runs = ", ".join(f"{x:.1f}" for x in secs[name])
        ld = ", ".join(f"{x:.2f}" for x in loads[name])
        out.append(f"| {name} | {statistics.median(secs[name]):.1f} | {runs} | {ld} |")
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="768,769,3072,3073")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "auto"))
    p.add_argument("--tokens", type=int, default=4096, help="rows of X in each X^T X / tokens")
    p.add_argument("--no-workers", action="store_true", help="skip the 2-workers rows")
    p.add_argument("--contend", default="", help="sizes to time again with a busy loop holding one core")
    p.add_argument("--contend-methods", default="float64,scipy-evd", help="methods to time with the busy loop")
    p.add_argument(
        "--end-to-end", action="store_true", help="also time all 48 GPT-2-small factors: one by one, then 2 workers"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eigh.md"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    contend = [int(s) for s in args.contend.split(",") if s]
    torch.set_num_threads(max(threads))

    start_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = (
        f"nproc {os.cpu_count()}, {cpu_model()}; torch {torch.__version__} "
        f"({'MKL' if torch.backends.mkl.is_available() else 'no MKL'}), Python {platform.python_version()}"
    )
    try:
        import scipy

        machine += f", scipy {scipy.__version__}"
    except ImportError:
        pass
    print(machine, "| load average", start_load, flush=True)
    mats, refs = {}, {}
    for n in sorted(set(sizes + contend)):
        mats[n] = factor(n, args.tokens)
        refs[n] = symmetric_eigh(mats[n], method="float64")
    print(HEADER, flush=True)
    rows = run_rows(args, sizes, methods, threads, not args.no_workers, "as found", mats, refs)
    if contend:
        spin = busy_loop()
        try:
            time.sleep(1.0)
            rows += run_rows(
                args, contend, args.contend_methods.split(","), threads, not args.no_workers, "busy loop", mats, refs
            )
        finally:
            spin.kill()
            spin.wait()
    e2e = end_to_end(args.tokens, args.repeats) if args.end_to_end else []
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    proj = projection(rows)
    print("\n".join(proj))

    cmd = "python benchmarks/eigh.py " + " ".join(sys.argv[1:])
    text = [
        "## Symmetric eigendecomposition of K-FAC factors (`headwater.curvature.linalg`)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {machine}. Load average (1, 5, 15 min) at start {start_load}, at end {end_load}; "
        "the column 'load before runs' is the 1-minute figure read before each timed run. 'other core' "
        "is 'as found' when the benchmark started nothing beside itself (another user's jobs may have "
        "been running: see the load), 'busy loop' while the benchmark kept one core busy itself.",
        "",
        f"Factors: X^T X / {args.tokens} (odd n: inputs with a bias column and mean offset; even n: "
        "gradients); accuracy against the float64 method; 'damped inv' is Q (e + 0.1 mean(e))^-1 Q^T v.",
        "",
        HEADER,
        *[row_line(r) for r in rows],
        "",
        "Projected eigendecomposition time for GPT-2 small's 24 MLP layers (the medians above):",
        "",
        *proj,
        "",
        *e2e,
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
