"""``ia3 train`` end to end through the CLI on tiny real models: every task, full precision and 4-bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from tests.conftest import tiny_recipe, write_recipe

runner = CliRunner()

CASES = [
    # (model kind, task, quantization)
    ("bert", "seq-cls", "none"),
    ("distilbert", "seq-cls", "none"),
    ("llama", "seq-cls", "none"),
    ("llama", "causal-lm", "none"),
    ("gpt2", "causal-lm", "none"),
    ("t5", "seq2seq", "none"),
    ("llama", "causal-lm", "4bit"),
    ("llama", "causal-lm", "8bit"),
    ("bert", "seq-cls", "4bit"),
    ("t5", "seq2seq", "4bit"),
]


def _train(tmp_path: Path, recipe: dict, *args: str):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    return runner.invoke(app, ["train", str(path), *args])


@pytest.mark.parametrize(("kind", "task", "quant"), CASES, ids=["-".join(c) for c in CASES])
def test_train_writes_a_loadable_peft_adapter(tiny_model, tmp_path: Path, kind: str, task: str, quant: str) -> None:
    from peft import PeftModel

    from ia3cli.config.recipe import ModelSection
    from ia3cli.models.loading import load_base

    model_dir = tiny_model(kind, task)
    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir, task, out, model={"quantization": quant})
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert "trainable params:" in result.output
    assert f"adapter saved to {out}" in result.output

    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "run.json",
        "metrics.json",
        "health.json",
        "README.md",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".staging-*")), "staging folder left behind"

    # the vectors moved away from their initial 1.0
    tensors = load_file(out / "adapter_model.safetensors")
    ia3 = [t for k, t in tensors.items() if "ia3_l" in k]
    assert ia3 and all(torch.isfinite(t).all() for t in ia3)
    assert max((t - 1).abs().max().item() for t in ia3) > 1e-4

    # standard PEFT loading works on the plain base, and the adapter changes the outputs
    base = load_base(ModelSection(name=str(model_dir), task=task), 2)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    kwargs = {"decoder_input_ids": ids[:, :2]} if task == "seq2seq" else {}
    with torch.no_grad():
        before = base(input_ids=ids, **kwargs).logits
        model = PeftModel.from_pretrained(base, str(out))
        after = model(input_ids=ids, **kwargs).logits
    assert not torch.allclose(before, after)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert metrics["world_size"] == 1 and metrics["global_batch_size"] == 8
    assert metrics["ia3_params"] > 0 and "train_runtime" in metrics and "train_samples_per_second" in metrics
    assert json.loads((out / "health.json").read_text())["status"] in ("ok", "warning")


def test_printed_parameter_count_equals_the_plan(tiny_model, tmp_path: Path) -> None:
    from ia3cli.config.load import validate_mapping
    from ia3cli.models import targets

    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run")
    loaded = validate_mapping(recipe)
    plan = targets.resolve(loaded.model, loaded.adapter, "causal-lm", 2)
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert f"IA3 vectors: {plan.ia3_params:,}" in result.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["ia3_params"] == plan.ia3_params


def test_seq_cls_evaluates_each_epoch_and_keeps_the_best(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("bert", "seq-cls"),
        "seq-cls",
        out,
        training={
            "max_steps": None,
            "epochs": 2,
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "load_best_model_at_end": True,
        },
    )
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_f1" in metrics
    assert metrics["global_step"] == 8  # 32 rows / batch 8 x 2 epochs
    assert (out / "checkpoints").is_dir()


def test_chat_messages_train_on_assistant_turns(tiny_model, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "is the food good"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "is the room clean"}, {"role": "assistant", "content": "no"}]},
    ] * 8
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out)
    recipe["data"] = {"path": str(data), "messages_column": "messages", "eval_split": None}
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_tensorboard_logs_include_ia3_health_values(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out, training={"report_to": ["tensorboard"]})
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.endswith("ia3/grad_norm_k") for t in tags), tags


# --- refusals: short message, exit status 2, nothing written --------------------------------------------------


def _assert_refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output, result.output


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"adapter": {"target_modules": ["k_proj", "nope_proj"]}}, ["adapter.target_modules", "nope_proj"]),
        (
            {"adapter": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}},
            ["adapter.feedforward_modules", "down_proj"],
        ),
        ({"data": {"label_column": "stars"}}, ["missing column 'stars'"]),
        ({"data": {"path": "/nonexistent/data.jsonl"}}, ["/nonexistent/data.jsonl", "not found"]),
        ({"data": {"prompt_template": "Review: {body}"}}, ["missing column 'body'", "data.prompt_template"]),
        (
            {"data": {"prompt_templates": ["Review: {text}", "{text} ({stars} stars)"]}},
            ["missing column 'stars'", "data.prompt_templates"],
        ),
        ({"data": {"prompt_templates": ["Review: {text"]}}, ["data.prompt_templates", "not a valid format string"]),
        ({"adapter": {"init_from": "/nonexistent/run"}}, ["adapter.init_from", "not a finished ia3cli run"]),
        ({"data": {"eval_split": "testing"}}, ["no split 'testing'", "available splits"]),
        ({"model": {"name": "/nonexistent/model"}}, ["model.name"]),
    ],
)
def test_preflight_failures_write_nothing(tiny_model, tmp_path: Path, change: dict, words: list[str]) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out, **change)
    result = _train(tmp_path, recipe)
    _assert_refused(result, *words)
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "row", "words"),
    [
        ('{"text": "fine", "label": 7}', 3, "label 7"),
        ('{"text": "", "label": 1}', 3, "column 'text' is empty"),
        ('{"text": "broken", "label": ', 3, "not valid JSON"),
    ],
)
def test_malformed_rows_are_named_by_number(tiny_model, tmp_path: Path, line: str, row: int, words: str) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n' + line + "\n")
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", out)
    recipe["data"] = {"path": str(data), "eval_split": None}
    recipe["training"]["eval_strategy"] = "no"
    result = _train(tmp_path, recipe)
    _assert_refused(result, f"row {row}", words)
    assert not out.exists()


def test_refuses_a_non_empty_output_dir_and_overwrite_replaces_an_earlier_run(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out)
    assert _train(tmp_path, recipe).exit_code == 0
    (out / "checkpoints" / "checkpoint-99").mkdir(parents=True)  # something only the earlier run had
    result = _train(tmp_path, recipe)
    _assert_refused(result, "is not empty", "--overwrite")
    assert (out / "checkpoints" / "checkpoint-99").is_dir()
    result = _train(tmp_path, recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoints" / "checkpoint-99").exists() and (out / "adapter_model.safetensors").is_file()


def test_debug_shows_the_traceback(tiny_model, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run", adapter={"target_modules": ["nope_proj"]}
    )
    result = _train(tmp_path, recipe, "--debug")
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "RecipeError"


def test_health_findings_reach_the_run_dir_and_the_summary(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"),
        "causal-lm",
        out,
        training={"learning_rate": 1e-12, "max_steps": 6},
        monitor={"every_steps": 1, "patience": 2},
    )
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert "health: warning" in result.output and "vectors_not_moving" in result.output
    health = json.loads((out / "health.json").read_text())
    assert health["status"] == "warning"
    codes = {f["code"] for f in health["findings"]}
    # at a learning rate of 1e-12 nothing is gained over the step-0 baseline either; the untouched tiny model may
    # also sit below the majority class
    expected = {"vectors_not_moving", "no_gain_over_base"}
    assert expected <= codes <= expected | {"below_majority_class"}


def test_on_problem_stop_ends_training_early(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"),
        "causal-lm",
        out,
        training={"learning_rate": 1e-12, "max_steps": 20},
        monitor={"every_steps": 1, "patience": 2, "on_problem": "stop"},
    )
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["global_step"] < 20


def test_non_finite_training_fails_with_exit_1_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"),
        "causal-lm",
        out,
        # an absurd learning rate: Adam moves every vector by ~1e37 at the first step, the next loss overflows
        training={
            "learning_rate": 1e37,
            "max_steps": 6,
            "warmup_ratio": 0.0,
            "save_strategy": "steps",
            "save_steps": 1,
        },
    )
    result = _train(tmp_path, recipe)
    assert result.exit_code == 1, result.output
    assert "training stopped" in result.output and "Traceback" not in result.output
    health = json.loads((out / "health.json").read_text())
    assert health["status"] == "failed"
    assert health["findings"][-1]["code"] == "nonfinite_loss"
    assert not (out / "adapter_model.safetensors").exists(), "a broken adapter must not be published"
    good = Path(health["last_good_checkpoint"])
    assert all(torch.isfinite(t).all() for t in load_file(good / "adapter_model.safetensors").values())
