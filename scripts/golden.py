"""Record (or compare) the engine's outputs on tiny fixed cases, to prove a refactor changes no number.

    python scripts/golden.py save /tmp/golden.safetensors      # before the change
    python scripts/golden.py check /tmp/golden.safetensors     # after it: bitwise on fp64, else 1e-5

Every case runs on CPU in one thread with fixed seeds: strategies x Fisher estimators x query
ranks on a tiny GPT-2, a tiny Llama and small MLPs, self-influence, candidates, refinement, the
index, and the reduced demo's score matrix.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import headwater as hw  # noqa: E402
from _models import (  # noqa: E402
    MLP,
    SharedMLP,
    classification_data,
    lm_data,
    lm_queries,
    regression_data,
    tiny_gpt2,
    tiny_llama,
)


def cases() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    train, queries = lm_data(12), lm_queries(3)
    for arch, make in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        for strategy in ("identity", "diagonal", "kfac", "ekfac"):
            for fisher in ("empirical", "topk", "sampled", "importance"):
                if strategy == "identity" and fisher != "empirical":
                    continue
                an = hw.Attributor(make(), strategy=strategy, fisher=fisher, seed=3)
                an.fit(train, batch_size=5)
                for rank in (None, 2):
                    sc = an.scores(queries, train, batch_size=5, query_rank=rank, per_layer=True, per_token=True)
                    key = f"{arch}/{strategy}/{fisher}/{rank}"
                    out[key + "/values"] = sc.values
                    out[key + "/tokens"] = sc.per_token
                    for n, v in sc.per_layer.items():
                        out[f"{key}/layer/{n}"] = v
                out[f"{arch}/{strategy}/{fisher}/self"] = an.self_influence(train, batch_size=5)
        an = hw.Attributor(make(), strategy="ekfac", fisher="empirical", modules="mlp")
        an.fit(train, batch_size=4)
        out[f"{arch}/candidates"] = an.scores(queries, train, batch_size=4, candidates=5).values
        out[f"{arch}/refine"] = an.scores(queries, train, batch_size=4, refine_steps=2).values
        with tempfile.TemporaryDirectory() as d:
            an2 = hw.Attributor(make(), strategy="ekfac", fisher="empirical", modules="mlp", workdir=d)
            an2.fit(train, batch_size=4)
            for curv in ("engine", "ekfac", "dense", "identity"):
                an2.build_index(train, dim=4, path=Path(d) / curv, curvature=curv, dtype="float32")
                out[f"{arch}/index/{curv}"] = an2.query_index(queries, index_path=Path(d) / curv).values
    for name, task, data in (
        ("cls", hw.ClassificationTask(), classification_data(20)),
        ("reg", hw.RegressionTask(), regression_data(20)),
    ):
        for fisher in ("exact", "topk", "sampled", "empirical"):
            an = hw.Attributor(MLP().double(), task=task, fisher=fisher, seed=1).fit(data, batch_size=6)
            out[f"{name}/{fisher}"] = an.scores(data[:4], data, batch_size=6).values
    an = hw.Attributor(SharedMLP().double(), task=hw.RegressionTask(), fisher="empirical")
    data = regression_data(10, d_in=4)
    out["shared"] = an.fit(data).scores(data[:3], data).values
    with tempfile.TemporaryDirectory() as d:
        from typer.testing import CliRunner

        from headwater.cli import app

        res = CliRunner().invoke(app, ["demo", "--small", "--quiet", "--out", d])
        if res.exit_code != 0:
            raise RuntimeError(res.output)
        tensors, _ = hw.storage.load_tensors(next(Path(d).rglob("scores.safetensors")))
        out["demo/values"] = tensors["values"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    from safetensors.torch import load_file, save_file

    now = cases()
    if mode == "save":
        save_file(now, path)
        print(f"saved {len(now)} tensors to {path}")
        return
    ref = load_file(path)
    bad = []
    for k in sorted(set(ref) | set(now)):
        if k not in ref or k not in now:
            bad.append(f"{k}: only in {'reference' if k in ref else 'this run'}")
            continue
        a, b = ref[k], now[k]
        if a.shape != b.shape:
            bad.append(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif a.dtype == torch.float64 and not k.startswith("demo") and not torch.equal(a, b):
            rel = ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()
            bad.append(f"{k}: fp64 not bitwise equal (max diff {(a - b).abs().max().item():.3g}, relative {rel:.2g})")
        elif not torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * a.abs().max().item()):
            bad.append(f"{k}: differs (max diff {(a.double() - b.double()).abs().max().item():.3g})")
    print("\n".join(bad) if bad else f"all {len(ref)} tensors equal")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
