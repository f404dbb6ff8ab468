"""The health monitor on real `transformers.Trainer` runs of tiny random models: each finding provoked for real.

A tiny Llama (2 layers, hidden 32) with IA3 on k_proj, v_proj and down_proj (feed-forward) trains a few steps on
random token ids. Findings are provoked by the learning rate, by scaling the loss inside `compute_loss`, or by writing
NaN into an IA3 vector mid-training. The rules themselves are tested without a Trainer in test_health.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ia3cli.config.recipe import MonitorSection
from ia3cli.models import targets
from ia3cli.training.monitor import GradNormMonitor
from ia3cli.training.vectors import ia3_parameters, layer_label

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ = 8
VOCAB = 128


def tiny_llama() -> torch.nn.Module:
    """A seeded tiny random Llama with IA3 on keys, values and the FFN down-projection."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    ia3 = IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    return get_peft_model(LlamaForCausalLM(config), ia3)


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids that are their own labels."""

    def __init__(self, rows: int = 64) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class ScaledLossTrainer(Trainer):
    """Multiplies the loss by `loss_scale` from step `scale_from` on (0-based optimiser step)."""

    loss_scale = 1.0
    scale_from = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * self.loss_scale if self.state.global_step >= self.scale_from else loss


class PoisonVector(TrainerCallback):
    """Writes NaN into the first IA3 vector at the end of step `at_step`."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            _, param, _, _ = ia3_parameters(model)[0]
            with torch.no_grad():
                param[0] = float("nan")


class Recorder(TrainerCallback):
    """Keeps each training log dict as a reporting callback receives it."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def run(
    tmp_path: Path,
    monitor: dict[str, Any] | None = None,
    lr: float = 3e-3,
    max_steps: int = 8,
    max_grad_norm: float | None = 1.0,
    trainer_cls: type[Trainer] = Trainer,
    callbacks: list[TrainerCallback] | None = None,
    after: list[TrainerCallback] | None = None,
    eval_rows: int = 0,
    **args: Any,
) -> tuple[Trainer, GradNormMonitor, list[str]]:
    """Train the tiny Llama with a monitor between ``callbacks`` and ``after`` (reporters); returns the trainer, the
    monitor and the printed lines."""
    lines: list[str] = []
    cfg = MonitorSection(**{"every_steps": 1, "patience": 2, "vanishing_below": 1e-7, **(monitor or {})})
    mon = GradNormMonitor(cfg, max_grad_norm, tmp_path, printer=lines.append)
    defaults = {
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
    }
    training_args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        learning_rate=lr,
        max_grad_norm=max_grad_norm if max_grad_norm is not None else 0.0,  # 0.0: the Trainer does not clip
        disable_tqdm=True,
        seed=0,
        **{**defaults, **args},
    )
    trainer = trainer_cls(
        model=tiny_llama(),
        args=training_args,
        train_dataset=RandomTokens(),
        eval_dataset=RandomTokens(eval_rows) if eval_rows else None,
        callbacks=[*(callbacks or []), mon, *(after or [])],
    )
    trainer.train()
    return trainer, mon, lines


def codes(mon: GradNormMonitor) -> set[str]:
    return {f["code"] for f in mon.findings}


def test_normal_run_is_ok_and_writes_health_json(tmp_path: Path) -> None:
    trainer, mon, lines = run(tmp_path, monitor={"every_steps": 2})
    assert mon.findings == [] and not mon.failed
    health = json.loads((tmp_path / "health.json").read_text())
    assert health["status"] == "ok"
    assert health["steps"] == 8
    assert health["findings"] == []
    for key in ("grad_norm", "drift", "at_init"):
        assert set(health["final"][key]) == {"k", "v", "ff"}
    assert all(0 < v < 1 for v in health["final"]["drift"].values())
    assert health["final"]["at_init"] == {"k": 0.0, "v": 0.0, "ff": 0.0}
    assert not list(tmp_path.glob("*.tmp"))
    assert [line.split(" |")[0] for line in lines] == ["step 2", "step 4", "step 6", "step 8"]
    assert lines[0].startswith("step 2 | grad k ") and " | drift k " in lines[0]
    assert mon.summary_line().startswith("health: ok (8 steps) | grad k ")


def test_group_values_reach_the_callbacks_after_the_monitor(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer, mon, _ = run(tmp_path, max_steps=3, after=[recorder])
    logs = recorder.logs
    assert len(logs) == 3
    # the Trainer's own log_history is left as the Trainer wrote it
    assert not any(key.startswith("ia3/") for entry in trainer.state.log_history for key in entry)
    for entry in logs:
        for group in ("k", "v", "ff"):
            assert entry[f"ia3/grad_norm_{group}"] > 0
            assert math.isfinite(entry[f"ia3/drift_{group}"])
            assert entry[f"ia3/at_init_{group}"] == 0.0
        assert not any("layer" in key for key in entry)


@pytest.mark.parametrize(
    "extra",
    [{}, {"gradient_accumulation_steps": 2}, {"gradient_checkpointing": True}],
    ids=["plain", "accumulation", "checkpointing"],
)
def test_norms_are_measured_before_clipping(tmp_path: Path, extra: dict[str, Any]) -> None:
    # Clip at 1e-6: the gradients the optimiser sees are tiny, but the monitor reports the pre-clip norms, whose
    # total is the pre-clip global norm the Trainer logs (IA3 vectors are the only trainable parameters here).
    # With accumulation the measurement after the last micro-batch wins; with checkpointing the backward nests.
    recorder = Recorder()
    trainer, mon, _ = run(tmp_path, max_steps=3, max_grad_norm=1e-6, after=[recorder], **extra)
    assert len(recorder.logs) == 3
    for entry in recorder.logs:
        total = math.sqrt(sum(entry[f"ia3/grad_norm_{g}"] ** 2 for g in ("k", "v", "ff")))
        assert total == pytest.approx(entry["grad_norm"], rel=1e-4)
        assert total > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_in_bfloat16(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer, mon, _ = run(tmp_path, max_steps=4, max_grad_norm=1e-6, use_cpu=False, bf16=True, after=[recorder])
    assert next(trainer.model.parameters()).is_cuda
    assert json.loads((tmp_path / "health.json").read_text())["status"] == "ok"
    for entry in recorder.logs:
        total = math.sqrt(sum(entry[f"ia3/grad_norm_{g}"] ** 2 for g in ("k", "v", "ff")))
        assert total == pytest.approx(entry["grad_norm"], rel=1e-3)


def test_per_layer_adds_layer_keys(tmp_path: Path) -> None:
    recorder = Recorder()
    run(tmp_path, monitor={"per_layer": True}, max_steps=2, after=[recorder])
    last = recorder.logs[-1]
    for layer in ("0", "1"):
        assert last[f"ia3/grad_norm_layer_{layer}"] > 0
        assert last[f"ia3/drift_layer_{layer}"] > 0
    per_layer = math.sqrt(last["ia3/grad_norm_layer_0"] ** 2 + last["ia3/grad_norm_layer_1"] ** 2)
    assert per_layer == pytest.approx(last["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("lr", [0.0, 1e-9])
def test_learning_rate_too_low_gives_vectors_not_moving(tmp_path: Path, lr: float) -> None:
    trainer, mon, lines = run(tmp_path, lr=lr, max_steps=5)
    assert codes(mon) == {"vectors_not_moving"}
    (finding,) = mon.findings
    assert finding["group"] is None  # every group: the learning rate, not the targets
    assert finding["step"] == 3  # checks 2 and 3 (the first check is skipped)
    assert "learning_rate" in finding["message"] and "1e-3..5e-3" in finding["message"]
    assert trainer.state.global_step == 5  # on_problem: warn keeps training
    assert sum(line.startswith("warning: vectors_not_moving") for line in lines) == 1
    health = json.loads((tmp_path / "health.json").read_text())
    assert health["status"] == "warning"
    if lr == 0.0:
        assert health["final"]["at_init"] == {"k": 1.0, "v": 1.0, "ff": 1.0}


def test_on_problem_stop_stops_training(tmp_path: Path) -> None:
    trainer, mon, lines = run(tmp_path, monitor={"on_problem": "stop"}, lr=0.0, max_steps=20)
    assert trainer.state.global_step == 3
    assert mon.stopped_by == "vectors_not_moving"
    assert any("on_problem: stop" in line for line in lines)
    assert json.loads((tmp_path / "health.json").read_text())["status"] == "warning"


def test_scaled_up_loss_gives_exploding_gradients(tmp_path: Path) -> None:
    # The Trainer clips at 1.0 so training stays finite; only a pre-clip measurement sees the explosion.
    trainer_cls = type("Scaled", (ScaledLossTrainer,), {"loss_scale": 1e6})
    trainer, mon, _ = run(tmp_path, trainer_cls=trainer_cls, max_steps=4)
    assert "exploding_gradients" in codes(mon) and not mon.failed
    finding = next(f for f in mon.findings if f["code"] == "exploding_gradients")
    assert finding["step"] == 2
    assert "learning_rate" in finding["message"] and "max_grad_norm" in finding["message"]
    assert trainer.state.global_step == 4
    assert all(e["grad_norm"] > 1e3 for e in trainer.state.log_history if "loss" in e)


def test_scaled_down_loss_gives_vanishing_gradients(tmp_path: Path) -> None:
    trainer_cls = type("Scaled", (ScaledLossTrainer,), {"loss_scale": 1e-9})
    _, mon, _ = run(tmp_path, trainer_cls=trainer_cls, monitor={"vanishing_below": 1e-4}, max_steps=3)
    finding = next(f for f in mon.findings if f["code"] == "vanishing_gradients")
    assert finding["group"] is None and finding["step"] == 2
    assert "inspect-modules" in finding["message"]
    assert json.loads((tmp_path / "health.json").read_text())["status"] == "warning"


def test_infinite_loss_fails_at_once(tmp_path: Path) -> None:
    trainer_cls = type("Infinite", (ScaledLossTrainer,), {"loss_scale": float("inf"), "scale_from": 2})
    trainer, mon, lines = run(tmp_path, trainer_cls=trainer_cls, monitor={"every_steps": 5}, max_steps=10)
    assert mon.failed and mon.stopped_by == "nonfinite_loss"
    assert [(f["code"], f["step"]) for f in mon.findings] == [("nonfinite_loss", 3)]
    assert trainer.state.global_step == 3
    # the broken gradients were dropped before the optimiser step: the vectors are still finite
    assert all(torch.isfinite(p).all() for _, p, _, _ in ia3_parameters(trainer.model))
    assert any(line.startswith("error: nonfinite_loss") for line in lines)
    assert mon.summary_line().startswith("health: FAILED at step 3")


@pytest.mark.parametrize(
    ("every_steps", "caught_at"),
    [
        (5, 4),  # the NaN gradient of step 4 (the per-step check)
        (1, 3),  # the NaN vector itself, at the drift check right after it was written
    ],
)
def test_nan_vector_stops_training_and_keeps_last_checkpoint(tmp_path: Path, every_steps: int, caught_at: int) -> None:
    trainer, mon, _ = run(
        tmp_path,
        monitor={"every_steps": every_steps},
        callbacks=[PoisonVector(at_step=3)],
        max_steps=10,
        save_strategy="steps",
        save_steps=2,
    )
    assert mon.failed
    assert [(f["code"], f["step"]) for f in mon.findings] == [("nonfinite_loss", caught_at)]
    assert trainer.state.global_step == caught_at
    assert not (tmp_path / "checkpoint-4").exists()  # save_steps=2 would have saved the broken state here
    good = tmp_path / "checkpoint-2"
    weights = load_file(good / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    health = json.loads((tmp_path / "health.json").read_text())  # valid JSON: NaN norms are written as null
    assert health["status"] == "failed"
    assert health["steps"] == caught_at
    assert health["last_good_checkpoint"] == str(good)
    assert health["findings"][0]["group"] is None and "checkpoint-2" in health["findings"][0]["message"]
    if caught_at == 4:
        assert health["final"]["grad_norm"]["k"] is None


def test_clipping_disabled_warns(tmp_path: Path) -> None:
    _, mon, lines = run(tmp_path, max_grad_norm=None, max_steps=1)
    assert lines[0].startswith("warning: gradient clipping is disabled")
    assert json.loads((tmp_path / "health.json").read_text())["max_grad_norm"] is None


def test_clipping_mismatch_is_refused(tmp_path: Path) -> None:
    mon = GradNormMonitor(MonitorSection(), 1.0, tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, max_grad_norm=0.0)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens(), callbacks=[mon])
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        trainer.train()


def test_reaches_tensorboard_listed_after_it(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    run(tmp_path, max_steps=2, after=[TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tmp_path / "logs")))])
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ia3/grad_norm_k", "train/ia3/drift_v", "train/ia3/at_init_ff"} <= tags


def test_last_good_checkpoint_is_one_that_exists(tmp_path: Path) -> None:
    """With save_total_limit 1 the Trainer deletes the last checkpoint at the end unless it is the best one."""
    _, mon, _ = run(
        tmp_path,
        max_steps=4,
        eval_rows=16,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the first evaluation (highest loss) is the "best": checkpoint-4 gets deleted
    )
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    health = json.loads((tmp_path / "health.json").read_text())
    assert health["last_good_checkpoint"] == str(tmp_path / "checkpoint-2")
    assert mon.saved_checkpoints == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("base_model.model.model.layers.12.self_attn.k_proj", "12"),
        ("base_model.model.bert.encoder.layer.0.attention.self.key", "0"),
        ("base_model.model.decoder.block.3.layer.0.SelfAttention.k", "dec_3"),
        ("base_model.model.score", None),
    ],
)
def test_layer_label(name: str, label: str | None) -> None:
    assert layer_label(name) == label


def test_groups_of_real_bert_and_gpt2() -> None:
    bert_config = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    ffn_out = r".*layer\.\d+\.output\.dense"
    bert = get_peft_model(
        BertForSequenceClassification(bert_config),
        IA3Config(target_modules=rf".*\.(key|value)|{ffn_out}", feedforward_modules=ffn_out, task_type="SEQ_CLS"),
    )
    groups = {(name.split(".encoder.")[-1], group, layer) for name, _, group, layer in ia3_parameters(bert)}
    assert ("layer.0.attention.self.key", "k", "0") in groups
    assert ("layer.1.attention.self.value", "v", "1") in groups
    assert ("layer.1.output.dense", "ff", "1") in groups
    assert {g for _, g, _ in groups} == {"k", "v", "ff"}

    gpt2 = get_peft_model(
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16)),
        IA3Config(
            target_modules=["c_attn", "mlp.c_proj"],
            feedforward_modules=["mlp.c_proj"],
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        ),
    )
    found = {(name.split(".h.")[-1], group) for name, _, group, _ in ia3_parameters(gpt2)}
    assert found == {("0.attn.c_attn", "qkv"), ("0.mlp.c_proj", "ff"), ("1.attn.c_attn", "qkv"), ("1.mlp.c_proj", "ff")}


def test_groups_come_from_the_target_plan() -> None:
    model = tiny_llama()
    config = model.get_base_model().config
    plan = targets.plan_for_model(LlamaForCausalLM(config), config, "causal-lm")
    by_plan = {name: group for name, _, group, _ in ia3_parameters(model, plan.groups)}
    assert by_plan == {name: group for name, _, group, _ in ia3_parameters(model)}  # the family table agrees
    assert set(by_plan.values()) == {"k", "v", "ff"}
    renamed = {n: "other" for n in plan.groups}  # the plan decides, not the module names
    assert {group for _, _, group, _ in ia3_parameters(model, renamed)} == {"other"}
