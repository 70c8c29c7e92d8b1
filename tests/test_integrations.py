"""HeadwaterCallback inside a real transformers.Trainer (tiny GPT-2, CPU, a few steps): the record holds what the
Trainer did, and SOURCE built from it equals SOURCE built by hand from the Trainer's own checkpoints."""

from __future__ import annotations

import pytest
import torch

import headwater as hw
from _models import tiny_gpt2
from headwater.training import Segment, Source, read_record, read_state_dict, source_from_training

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")
from transformers import Trainer, TrainingArguments  # noqa: E402

from headwater.integrations import HeadwaterCallback  # noqa: E402


def _data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (8,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _train(model, data, directory, record, stage, steps=6, lr=1e-3):
    args = TrainingArguments(
        output_dir=str(directory),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=2,
        save_only_model=True,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[HeadwaterCallback(record, every=2, stage=stage)]
    )
    trainer.train()
    return trainer


def test_the_callback_records_what_the_trainer_did_and_source_runs_from_the_record(tmp_path) -> None:
    model = tiny_gpt2(dtype=torch.float32).train()
    pre, fine = _data(16, 0), _data(8, 1)
    record = tmp_path / "record"
    t1 = _train(model, pre, tmp_path / "out1", record, "pretrain")
    t2 = _train(model, fine, tmp_path / "out2", record, "finetune", steps=4, lr=5e-4)
    run = read_record(record)
    assert [s["name"] for s in run["stages"]] == ["pretrain", "finetune"]
    assert all(s["loss_scale"] == "token" for s in run["stages"])  # the Trainer's causal-LM loss is a token mean
    segs = run["segments"]
    assert [(s["stage"], s["steps"], s["optimizer"]) for s in segs] == [("pretrain", 2, "adamw")] * 3 + [
        ("finetune", 2, "adamw")
    ] * 2
    # linear decay to 0 over max_steps: lr_k = lr (1 - k / max_steps), summed over each segment's steps
    expected = [1e-3 * (2 - (2 * j + (2 * j + 1)) / 6) for j in range(3)] + [
        5e-4 * (2 - (2 * j + 2 * j + 1) / 4) for j in range(2)
    ]
    assert [s["groups"][0]["lr_sum"] for s in segs] == pytest.approx(expected)
    decay = {p: g["weight_decay"] for g in segs[0]["groups"] for p in g["params"]}
    assert decay["transformer.h.0.mlp.c_fc.weight"] == 0.01 and decay["transformer.h.0.mlp.c_fc.bias"] == 0.0
    # Adam's state at the end of the last segment, as the Trainer's optimizer holds it
    opt = t2.optimizer.optimizer if hasattr(t2.optimizer, "optimizer") else t2.optimizer
    name = {id(p): n for n, p in model.named_parameters()}
    saved = read_state_dict(record / segs[-1]["checkpoint"] / "second_moments.safetensors")
    for p, state in opt.state.items():
        corrected = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        torch.testing.assert_close(saved[name[id(p)]], corrected)
    # the recorded weights are the Trainer's checkpoints
    for seg, ckpt in zip(
        segs, ["out1/checkpoint-2", "out1/checkpoint-4", "out1/checkpoint-6", "out2/checkpoint-2", "out2/checkpoint-4"]
    ):
        ours, theirs = read_state_dict(record / seg["checkpoint"]), read_state_dict(tmp_path / ckpt)
        for k, v in theirs.items():
            torch.testing.assert_close(ours[k], v)

    queries = _data(2, 5)
    task = hw.LanguageModelingTask()
    src = source_from_training(record, {"pretrain": pre, "finetune": fine}, task=task, modules="mlp", batch_size=4)
    assert type(src.model).__name__ == "GPT2LMHeadModel"  # rebuilt from the saved config, no network
    got = src.scores(queries).values
    # by hand: the Trainer's checkpoint directories, and the segments typed in
    train = pre + fine
    moments = [read_state_dict(record / s["checkpoint"] / "second_moments.safetensors") for s in segs]
    hand = [
        Segment(
            lr=expected[i] / 2,
            steps=2,
            data=list(range(16)) if i < 3 else list(range(16, 24)),
            optimizer="adamw",
            second_moments=moments[i],
            weight_decay=decay,
            loss_scale="token",
        )
        for i in range(5)
    ]
    ckpts = [
        tmp_path / c
        for c in (
            "out1/checkpoint-2",
            "out1/checkpoint-4",
            "out1/checkpoint-6",
            "out2/checkpoint-2",
            "out2/checkpoint-4",
        )
    ]
    by_hand = Source(tiny_gpt2(dtype=torch.float32), ckpts, hand, train, task=task, modules="mlp", batch_size=4)
    torch.testing.assert_close(got, by_hand.scores(queries).values)
    assert bool((got != 0).all()) and t1.state.global_step == 6
