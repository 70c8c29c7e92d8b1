"""The projected-gradient index against exact references.

Ground truth comes from outside the index: autograd gradients (``_reference.autograd_grads``),
the dense Gauss-Newton (``_reference.dense_gauss_newton``) and the engine's own scores, which
the index must reproduce exactly when its projections are full-dimensional rotations.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

import headwater as hw
import headwater.index as hwi
from _models import MLP, classification_data, lm_data, lm_queries, regression_data, tiny_gpt2
from _reference import autograd_grads, blocks, dense_gauss_newton
from headwater.curvature import Projected
from headwater.engine import Consumer
from headwater.index import CorruptIndexError, GradientIndex, build_index, query_index


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _projected_reference(an, data, index: GradientIndex) -> torch.Tensor:
    """[N, D]: autograd's per-example gradients, materialized, then projected on both sides."""
    full = autograd_grads(an.model, an.task, data, an.layers)  # [N, P] float64
    proj = index.projections()
    out, lo = [], 0
    for name, ad in an.layers.items():
        g = full[:, lo : lo + ad.out_features * ad.in_features].reshape(-1, ad.out_features, ad.in_features)
        lo += ad.out_features * ad.in_features
        p_out, p_in = proj[name]
        out.append((p_out @ g @ p_in.mT).reshape(len(data), -1))
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def test_factored_projection_equals_projecting_the_materialized_gradient_fp64(gpt2):
    """(g P_out^T)^T (a P_in^T) summed over tokens == P_out (sum_t g a^T) P_in^T, in float64."""
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train = lm_data(5)
    layout = hwi.layout_for(an.layers, 5)
    projector = Projected(None, hwi.make_projections(an, layout, "gaussian", seed=3))
    got = {}

    class Records(Consumer):
        def update(self, c, start, first):
            got[c.name] = projector.records(c)

    an.run(train, Records(), an.training_loss, "t", 5)
    full = autograd_grads(gpt2, an.task, train, an.layers)
    lo = 0
    for name, ad in an.layers.items():
        g = full[:, lo : lo + ad.out_features * ad.in_features].reshape(-1, ad.out_features, ad.in_features)
        lo += ad.out_features * ad.in_features
        p_out, p_in = projector.projections[name]
        assert got[name].dtype == torch.float64 and got[name].shape == (5, 5, 5)
        torch.testing.assert_close(got[name], p_out @ g @ p_in.mT, rtol=1e-10, atol=1e-12)


def test_shards_of_odd_sizes_assemble_in_dataset_order(tmp_path, gpt2):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train = lm_data(11)
    idx = build_index(
        an, train, dim=4, batch_size=3, path=tmp_path, dtype="float32", shard_size=4, curvature="identity"
    )
    assert [(e["file"], e["start"], e["stop"]) for e in idx.shards] == [
        ("shard-00000.bin", 0, 4),
        ("shard-00001.bin", 4, 8),
        ("shard-00002.bin", 8, 11),
    ]
    assert idx.record_dim == 4 * 16 and idx.dtype == "float32"
    expected = _projected_reference(an, train, idx)
    torch.testing.assert_close(idx.records().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(idx.records(3, 9).double(), expected[3:9], rtol=1e-5, atol=1e-6)
    # the raw files are plain little-endian arrays: readable without headwater
    raw = np.fromfile(tmp_path / "shard-00002.bin", dtype="<f4").reshape(3, -1)
    torch.testing.assert_close(torch.from_numpy(raw).double(), expected[8:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_half_precision_records_round_to_the_exact_ones(tmp_path, gpt2, dtype, tol):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train = lm_data(4)
    idx = build_index(an, train, dim=4, path=tmp_path, dtype=dtype, curvature="identity")
    expected = _projected_reference(an, train, idx)
    got = idx.records().double()
    assert (got - expected).abs().max() <= tol * expected.abs().max()


def test_projections_are_seeded_and_preserve_inner_products_in_expectation():
    for kind in ("gaussian", "rademacher", "orthogonal"):
        a = hwi.random_projection(kind, 64, 40, seed=7)
        torch.testing.assert_close(a, hwi.random_projection(kind, 64, 40, seed=7))
        assert not torch.equal(a, hwi.random_projection(kind, 64, 40, seed=8))
        mean = (
            sum(
                hwi.random_projection(kind, 8, 40, seed=s).mT @ hwi.random_projection(kind, 8, 40, seed=s)
                for s in range(400)
            )
            / 400
        )
        torch.testing.assert_close(mean, torch.eye(40, dtype=torch.float64), atol=0.15, rtol=0)
    q = hwi.random_projection("orthogonal", 12, 12, seed=1)
    torch.testing.assert_close(q @ q.mT, torch.eye(12, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Scores: full-dimensional orthogonal projections reproduce the exact ones
# ---------------------------------------------------------------------------------------


def test_identity_scores_with_full_dim_orthogonal_projection_equal_exact_gradient_dot_products(tmp_path, gpt2):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train, queries = lm_data(7), lm_queries(3)
    build_index(
        an,
        train,
        dim=65,
        batch_size=3,
        path=tmp_path,
        projection="orthogonal",
        dtype="float32",
        curvature="identity",
        shard_size=3,
    )
    res = query_index(an, queries, tmp_path, per_layer=True, top_k=2)
    exact = (
        autograd_grads(gpt2, an.task, queries, an.layers, measurement=True)
        @ autograd_grads(gpt2, an.task, train, an.layers).T
    )
    scale = exact.abs().max()
    torch.testing.assert_close(res.values.double(), exact, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(sum(res.per_layer.values()), res.values)
    assert res.meta["top"]["indices"] == res.top(2).indices.tolist()
    engine = an.scores(queries, train).values
    torch.testing.assert_close(res.values.double(), engine, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("strategy, projection", [("ekfac", "orthogonal"), ("kfac", "kfac")])
def test_projected_eigen_curvature_with_full_dim_rotation_equals_the_engine(tmp_path, gpt2, projection, strategy):
    """A_p = P A P^T has eigenvectors P Q_A and the same eigenvalues, and the projected
    eigenvalue correction equals the engine's: the scores are the engine's scores.

    Needs more scored tokens than any layer's width: with rank-deficient factors EK-FAC
    depends on an arbitrary basis of the near-null space, in the engine as in the index.
    Sampled labels match because the index's curvature passes use the engine's phase seeds.
    """
    an = hw.Attributor(gpt2, modules="mlp", strategy=strategy)
    train, queries = lm_data(24), lm_queries(3)
    an.fit(train, batch_size=4)
    engine = an.scores(queries, train, batch_size=4, per_layer=True)
    build_index(
        an,
        train,
        dim=100,
        batch_size=4,
        path=tmp_path,
        projection=projection,
        dtype="float32",
        curvature=strategy,
        shard_size=8,
    )
    res = query_index(an, queries, tmp_path, per_layer=True)
    for name in an.layers:
        scale = engine.per_layer[name].abs().max()
        torch.testing.assert_close(res.per_layer[name].double(), engine.per_layer[name], rtol=1e-4, atol=1e-5 * scale)
    assert res.meta["damping"] == pytest.approx(an.damping())


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_projected_engine_curvature_with_full_dim_rotation_equals_the_engine(tmp_path, gpt2, strategy):
    """curvature='engine' is P G P^T of the fitted G itself: with P a rotation the scores are the
    engine's, even when the factors are rank-deficient (10 short sequences, 64-wide layers)."""
    an = hw.Attributor(gpt2, modules="mlp", strategy=strategy)
    train, queries = lm_data(10), lm_queries(3)
    an.fit(train, batch_size=4)
    engine = an.scores(queries, train, batch_size=4).values
    build_index(an, train, dim=65, path=tmp_path, projection="orthogonal", dtype="float32", curvature="engine")
    res = query_index(an, queries, tmp_path)
    torch.testing.assert_close(res.values.double(), engine, rtol=1e-4, atol=1e-5 * engine.abs().max())
    assert res.meta["damping"] == pytest.approx(an.damping())


def test_dense_projected_gauss_newton_with_full_dim_rotation_equals_the_dense_reference(tmp_path):
    """fisher='exact': the projected dense curvature is P G P^T with G from jacobians and the
    output Hessian, so scores equal g_q^T (G + lambda I)^-1 g_m per layer, lambda = 0.1 mean eig."""
    model = MLP().double()
    task = hw.ClassificationTask()
    train, queries = classification_data(9), classification_data(3, seed=11)
    an = hw.Attributor(model, task=task, strategy="identity", fisher="exact")
    build_index(
        an,
        train,
        dim=8,
        batch_size=4,
        path=tmp_path,
        projection="orthogonal",
        dtype="float32",
        curvature="dense",
        shard_size=5,
    )
    res = query_index(an, queries, tmp_path, per_layer=True)
    gn = blocks(dense_gauss_newton(model, an.layers, torch.stack([x for x, _ in train]), "ce"), an.layers)
    g_train = autograd_grads(model, task, train, an.layers)
    g_query = autograd_grads(model, task, queries, an.layers, measurement=True)
    lo = 0
    for name, ad in an.layers.items():
        size = ad.out_features * ad.in_features
        g = gn[name]
        lam = 0.1 * torch.trace(g).item() / size
        expected = g_query[:, lo : lo + size] @ torch.linalg.solve(
            g + lam * torch.eye(size, dtype=g.dtype), g_train[:, lo : lo + size].T
        )
        lo += size
        torch.testing.assert_close(res.per_layer[name].double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
        assert res.meta["damping"][name] == pytest.approx(lam)


def test_defaults_workdir_path_and_engine_curvature_when_fitted_else_projected_ekfac(tmp_path, gpt2):
    assert (
        build_index(
            hw.Attributor(gpt2, modules="mlp", strategy="identity"), lm_data(6), dim=4, path=tmp_path / "i"
        ).manifest["curvature"]["kind"]
        == "ekfac"
    )
    an = hw.Attributor(gpt2, modules="mlp", workdir=tmp_path / "w").fit(lm_data(6))
    idx = build_index(an, lm_data(6), dim=4)
    assert idx.path == tmp_path / "w" / "index"
    assert idx.manifest["curvature"]["kind"] == "engine" and idx.manifest["complete"]
    manifest = json.loads((idx.path / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == hw.storage.model_fingerprint(gpt2)
    assert manifest["data_fingerprint"] == hw.data.fingerprint(lm_data(6))
    assert manifest["projection"]["kind"] == "gaussian" and manifest["projection"]["seed"] == an.seed
    res = query_index(an, lm_queries(2), top_k=3)
    assert res.values.shape == (2, 6) and len(res.meta["top"]["indices"][0]) == 3


# ---------------------------------------------------------------------------------------
# Persistence: resume, corruption, distributed
# ---------------------------------------------------------------------------------------


class _CrashingTask(hw.LanguageModelingTask):
    """Raises KeyboardInterrupt on the ``crash_at``-th training loss while armed (a killed build)."""

    crash_at: int | None = None
    calls = 0

    def loss(self, model, batch, sample=False):
        _CrashingTask.calls += 1
        if _CrashingTask.crash_at is not None and _CrashingTask.calls == _CrashingTask.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return super().loss(model, batch, sample)


def test_interrupted_build_resumes_at_the_next_shard_and_gives_an_identical_index(tmp_path, gpt2, monkeypatch):
    an = hw.Attributor(gpt2, task=_CrashingTask(), modules="mlp")
    train = lm_data(10)
    kwargs = dict(dim=4, batch_size=2, shard_size=3, curvature="ekfac")
    reference = build_index(an, train, path=tmp_path / "ref", **kwargs)

    _CrashingTask.calls, _CrashingTask.crash_at = 0, 5  # shards of 3 records in batches of 2: dies in shard 2
    with pytest.raises(KeyboardInterrupt):
        build_index(an, train, path=tmp_path / "run", **kwargs)
    _CrashingTask.crash_at = None
    partial = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["file"] for e in partial["shards"]] == ["shard-00000.bin", "shard-00001.bin"]
    assert not partial["complete"] and not list((tmp_path / "run").glob("*.part"))
    with pytest.raises(ValueError, match=r"incomplete \(2 of 4 shards.*run build_index with the same arguments"):
        query_index(an, lm_queries(1), tmp_path / "run")

    passes = []
    run_pass = hw.attributor.run_pass

    def spy(*args, **kw):  # the public loop: which shards pass over their records
        if kw["phase"] == "index records":
            passes.append(args[3].start)
        return run_pass(*args, **kw)

    monkeypatch.setattr(hw.attributor, "run_pass", spy)
    resumed = build_index(an, train, path=tmp_path / "run", **kwargs)
    assert passes == [6, 9]  # only the missing shards
    assert resumed.manifest["shards"] == reference.manifest["shards"]  # same bytes, same checksums
    assert _sha(tmp_path / "run" / "curvature.safetensors") == _sha(tmp_path / "ref" / "curvature.safetensors")
    torch.testing.assert_close(
        query_index(an, lm_queries(2), resumed).values, query_index(an, lm_queries(2), reference).values
    )
    passes.clear()
    build_index(an, train, path=tmp_path / "run", **kwargs)  # complete: nothing to do
    assert passes == []


def test_corrupted_or_truncated_shard_is_detected_with_an_error_naming_the_file(tmp_path, gpt2):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train = lm_data(9)
    build_index(an, train, dim=4, path=tmp_path, shard_size=3, curvature="identity")
    shard = tmp_path / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    GradientIndex.open(tmp_path)  # sizes still match: only the checksum can tell
    with pytest.raises(CorruptIndexError, match=r"shard-00001\.bin does not match its sha256 checksum"):
        GradientIndex.open(tmp_path, verify=True)
    with pytest.raises(CorruptIndexError, match=r"shard-00001\.bin does not match its sha256"):
        query_index(an, lm_queries(1), tmp_path)

    last = tmp_path / "shard-00002.bin"
    last.write_bytes(last.read_bytes()[:-7])
    with pytest.raises(CorruptIndexError, match=r"shard-00002\.bin is \d+ bytes but the manifest records \d+"):
        GradientIndex.open(tmp_path)
    last.unlink()
    with pytest.raises(CorruptIndexError, match=r"shard-00002\.bin is missing"):
        GradientIndex.open(tmp_path)

    # a rebuild with the same arguments rewrites exactly the damaged shards
    fixed = build_index(an, train, dim=4, path=tmp_path, shard_size=3, curvature="identity")
    fixed.verify()
    clean = build_index(an, train, dim=4, path=tmp_path / "clean", shard_size=3, curvature="identity")
    assert fixed.manifest["shards"] == clean.manifest["shards"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        an = hw.Attributor(MLP().double(), task=hw.ClassificationTask(), strategy="identity", fisher="exact")
        build_index(an, classification_data(11), dim=8, batch_size=2, path=path, shard_size=3, curvature="dense")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_build_equals_the_single_process_build(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path / "dist")), nprocs=2)
    an = hw.Attributor(MLP().double(), task=hw.ClassificationTask(), strategy="identity", fisher="exact")
    single = build_index(
        an, classification_data(11), dim=8, batch_size=2, path=tmp_path / "one", shard_size=3, curvature="dense"
    )
    dist = GradientIndex.open(tmp_path / "dist", verify=True)
    assert dist.manifest["shards"] == single.manifest["shards"]
    assert not list((tmp_path / "dist").glob("*.entry.json"))
    for name, op in single.curvature().items():
        torch.testing.assert_close(dist.curvature()[name].to_dense(), op.to_dense())


# ---------------------------------------------------------------------------------------
# Errors at the boundary
# ---------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(tmp_path, gpt2, monkeypatch):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    train = lm_data(3)
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        build_index(an, train, dim=0, path=tmp_path)
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        build_index(an, train, shard_size=-1, path=tmp_path)
    with pytest.raises(ValueError, match=r"projection='pca' is unknown; choose one of \('gaussian'"):
        build_index(an, train, projection="pca", path=tmp_path)
    with pytest.raises(ValueError, match=r"dtype='int8' is unknown"):
        build_index(an, train, dtype="int8", path=tmp_path)
    with pytest.raises(ValueError, match=r"curvature='lissa' is unknown"):
        build_index(an, train, curvature="lissa", path=tmp_path)
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        build_index(an, train, seed="1", path=tmp_path)
    with pytest.raises(ValueError, match="pass path=..., or create the Attributor with workdir="):
        build_index(an, train)
    monkeypatch.setattr(hwi, "DENSE_MAX", 100)  # c_fc projected to 11 x 11 = 121 coordinates
    with pytest.raises(ValueError, match=r"curvature='dense' needs k_out\*k_in <= 100 .*11x11; lower dim or use"):
        build_index(an, train, dim=11, curvature="dense", path=tmp_path)
    with pytest.raises(hw.NotFittedError, match="projection='kfac' needs fitted K-FAC/EK-FAC factors"):
        build_index(hw.Attributor(gpt2, modules="mlp"), train, projection="kfac", path=tmp_path)
    with pytest.raises(ValueError, match="projection='kfac' takes the top eigenvectors.*DiagonalCurvature"):
        build_index(
            hw.Attributor(gpt2, modules="mlp", strategy="diagonal").fit(train), train, projection="kfac", path=tmp_path
        )
    with pytest.raises(ValueError, match="curvature='engine' projects the attributor's fitted curvature, but layer"):
        build_index(an, train, dim=4, curvature="engine", path=tmp_path / "e1")
    with pytest.raises(hw.NotFittedError, match="curvature='engine' projects the attributor's fitted curvature; call"):
        build_index(hw.Attributor(gpt2, modules="mlp"), train, dim=4, curvature="engine", path=tmp_path / "e2")
    with pytest.raises(FileNotFoundError, match=r"no index at .*manifest.json is missing"):
        query_index(an, lm_queries(1), tmp_path / "nothing")


def test_a_different_build_at_the_same_path_needs_overwrite(tmp_path, gpt2):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    build_index(an, lm_data(4), dim=4, path=tmp_path, curvature="identity")
    with pytest.raises(
        ValueError, match=r"was built with data_fingerprint=.* use another path, or pass overwrite=True"
    ):
        build_index(an, lm_data(4, seed=9), dim=4, path=tmp_path, curvature="identity")
    with pytest.raises(ValueError, match=r"was built with projection=\{.*'dim': 4"):
        build_index(an, lm_data(4), dim=5, path=tmp_path, curvature="identity")
    idx = build_index(an, lm_data(4, seed=9), dim=5, path=tmp_path, curvature="identity", overwrite=True)
    assert idx.manifest["data_fingerprint"] == hw.data.fingerprint(lm_data(4, seed=9))


def test_querying_with_another_model_or_layer_set_is_an_error(tmp_path, gpt2):
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    build_index(an, lm_data(4), dim=4, path=tmp_path, curvature="identity")
    other = tiny_gpt2(seed=5)
    with pytest.raises(ValueError, match="was built for another model"):
        query_index(hw.Attributor(other, modules="mlp", strategy="identity"), lm_queries(1), tmp_path)
    with pytest.raises(ValueError, match="tracks layers .* but this Attributor tracks"):
        query_index(hw.Attributor(gpt2, strategy="identity"), lm_queries(1), tmp_path)
    with pytest.raises(ValueError, match="damping must be None or a non-negative number, got -1"):
        query_index(an, lm_queries(1), tmp_path, damping=-1)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        query_index(an, lm_queries(1), tmp_path, top_k=0)
    with pytest.raises(ValueError, match="use_faiss=True answers top-k only"):
        query_index(an, lm_queries(1), tmp_path, use_faiss=True)


def test_gradients_beyond_float16_range_are_refused_with_a_fix(tmp_path):
    model = MLP(d_out=3).double()
    data = [(x, y * 1e6) for x, y in regression_data(4)]  # residuals ~1e6 overflow float16
    an = hw.Attributor(model, task=hw.RegressionTask(), strategy="identity")
    with pytest.raises(ValueError, match=r"do not fit in float16 .*dtype='bfloat16' or dtype='float32'"):
        build_index(an, data, dim=4, path=tmp_path, curvature="identity")
    idx = build_index(an, data, dim=4, path=tmp_path / "bf", curvature="identity", dtype="bfloat16")
    assert torch.isfinite(idx.records()).all()


@pytest.mark.parametrize("ivf_min", [10**9, 1])  # exact flat index; IVF (one cell, float16 vectors)
def test_faiss_top_k_equals_the_scan(tmp_path, gpt2, monkeypatch, ivf_min):
    pytest.importorskip("faiss")
    monkeypatch.setattr(hwi, "FAISS_IVF_MIN", ivf_min)
    an = hw.Attributor(gpt2, modules="mlp", strategy="identity")
    build_index(an, lm_data(40), dim=4, path=tmp_path, shard_size=15, curvature="identity", dtype="float32")
    scan = query_index(an, lm_queries(3), tmp_path, top_k=4)
    fast = query_index(an, lm_queries(3), tmp_path, top_k=4, use_faiss=True)
    assert fast.meta["top"]["indices"] == scan.meta["top"]["indices"]
    torch.testing.assert_close(fast.top(4).values, scan.top(4).values, rtol=2e-3, atol=1e-5)
    assert len(list(tmp_path.glob("faiss-*.index"))) == 1  # built once, reused by the next query
    query_index(an, lm_queries(1), tmp_path, top_k=2, use_faiss=True)
    assert len(list(tmp_path.glob("faiss-*.index"))) == 1


# ---------------------------------------------------------------------------------------
# CLI: `headwater index build / query` on a local model directory
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_workdir(tmp_path_factory):
    """A tiny GPT-2 + tokenizer saved with save_pretrained, fitted by `headwater fit` and scored
    exactly by `headwater score --query-rank 0` (the reference for the index's scores)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from headwater.cli import app
    from headwater.demo import make_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("index_cli")
    corpus = make_corpus(seed=3, small=True)
    tok = train_tokenizer(corpus.docs, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus.docs[:24]))
    queries = [{"prompt": q["prompt"], "completion": q["completion"]} for q in corpus.queries[:2]]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    wd = root / "wd"
    runner = CliRunner()
    args = [
        "fit",
        "--model",
        root / "model",
        "--data",
        root / "train.jsonl",
        "--workdir",
        wd,
        "--batch-size",
        8,
        "--max-length",
        40,
        "--quiet",
    ]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    args = ["score", "--workdir", wd, "--out", wd, "--queries", root / "queries.jsonl", "--query-rank", 0, "--quiet"]
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    return {"root": root, "wd": wd, "queries": root / "queries.jsonl", "runner": runner}


def _invoke_index(ctx, *args):
    from headwater.cli.index import index_app

    return ctx["runner"].invoke(index_app, [str(a) for a in args])


def test_cli_build_and_query_reproduce_the_engine_scores_with_a_full_dim_rotation(cli_workdir):
    ctx = cli_workdir
    res = _invoke_index(
        ctx,
        "build",
        "--workdir",
        ctx["wd"],
        "--dim",
        65,
        "--projection",
        "orthogonal",
        "--curvature",
        "ekfac",
        "--dtype",
        "float32",
        "--shard-size",
        10,
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    out = ctx["wd"] / "index-run"
    res = _invoke_index(
        ctx, "query", "--workdir", ctx["wd"], "--queries", ctx["queries"], "--top-k", 3, "--out", out, "--quiet"
    )
    assert res.exit_code == 0, res.output
    from headwater.storage import load_tensors

    index_scores, meta = load_tensors(out / "scores.safetensors")
    engine_scores, _ = load_tensors(ctx["wd"] / "scores.safetensors")
    exact = engine_scores["values"]
    torch.testing.assert_close(index_scores["values"].to(exact.dtype), exact, rtol=1e-4, atol=1e-5 * exact.abs().max())
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [e["index"] for e in results[0]["top"]] == exact[0].topk(3).indices.tolist()
    assert "index (orthogonal projection, dim 65, ekfac curvature)" in (out / "report.html").read_text()
    assert (ctx["wd"] / "report.html").exists()  # the engine's report is left alone


def test_cli_errors_are_one_line(cli_workdir, tmp_path):
    ctx = cli_workdir
    res = _invoke_index(ctx, "query", "--workdir", ctx["wd"], "--queries", ctx["queries"], "--index", tmp_path / "none")
    assert res.exit_code == 2 and "no index at" in res.stderr and "Traceback" not in res.stderr
    res = _invoke_index(ctx, "build", "--workdir", tmp_path / "missing", "--quiet")
    assert res.exit_code == 2 and "does not exist; run `headwater fit" in res.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a different training document"}) + "\n")
    res = _invoke_index(ctx, "query", "--workdir", ctx["wd"], "--queries", ctx["queries"], "--data", other)
    assert res.exit_code == 2 and "was built from other data" in res.stderr
