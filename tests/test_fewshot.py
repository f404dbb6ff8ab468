"""Few-shot training end to end on tiny models: per-row choices, rank classification at every evaluation, prompt
templates, Adafactor, starting from an earlier run's vectors, and the step-budget warning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.recipe import TrainingSection
from ia3cli.training.budget import budget_warning, optimizer_steps
from tests.conftest import SENTIMENT, tiny_recipe, write_recipe

runner = CliRunner()
NAMES = ["negative", "positive"]


def _train(tmp_path: Path, recipe: dict, *args: str, name: str = "recipe.yaml"):
    return runner.invoke(app, ["train", str(write_recipe(tmp_path / name, recipe)), *args])


def _multiple_choice_data(folder: Path) -> Path:
    """Sentiment rows as multiple choice: 2 or 3 options per row in varying order; the answer given as the
    option's text on some rows and as its index on others."""
    folder.mkdir()
    rng = random.Random(0)
    for src, dest, n in (("train.jsonl", "train.jsonl", 40), ("dev.jsonl", "validation.jsonl", 12)):
        rows = [json.loads(line) for line in (SENTIMENT / src).read_text().splitlines()[:n]]
        with (folder / dest).open("w") as fh:
            for i, row in enumerate(rows):
                options = NAMES + (["the"] if i % 2 else [])
                rng.shuffle(options)
                correct = NAMES[row["label"]]
                answer = correct if i % 3 else options.index(correct)
                fh.write(json.dumps({"text": row["text"], "options": options, "answer": answer}) + "\n")
    return folder


def _choice_recipe(model_dir: Path, out: Path, data: Path, **training) -> dict:
    recipe = tiny_recipe(
        model_dir, "causal-lm", out,
        data={"path": str(data), "label_names": None, "choices_column": "options", "label_column": "answer",
              "eval_samples": None},
        training={"objective": "tfew", "max_steps": 6, "eval_strategy": "steps", "eval_steps": 2,
                  "save_strategy": "steps", "save_steps": 2, "metric": "accuracy", "load_best_model_at_end": True,
                  **training},
    )  # fmt: skip
    recipe["data"].pop("label_names")
    return recipe


def _log_evals(out: Path) -> list[dict]:
    state = max((out / "checkpoints").glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    return [e for e in json.loads(state.read_text())["log_history"] if "eval_loss" in e]


def test_per_row_choices_train_with_tfew_and_rank_classify_at_every_evaluation(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = _multiple_choice_data(tmp_path / "mc")
    result = _train(tmp_path, _choice_recipe(tiny_model("llama", "causal-lm"), out, data))
    assert result.exit_code == 0, result.output
    evals = _log_evals(out)
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and "eval_f1" in e for e in evals)
    state = json.loads(next((out / "checkpoints").glob("checkpoint-6/trainer_state.json")).read_text())
    assert state["best_metric"] == max(e["eval_accuracy"] for e in evals)  # accuracy picked the checkpoint

    metrics = json.loads((out / "metrics.json").read_text())
    again = runner.invoke(app, ["eval", str(out), "--json"])
    assert again.exit_code == 0, again.output
    evaluated = json.loads(again.output)
    # the Trainer's rank classification (choice batches) and `ia3 eval`'s agree on every row
    assert evaluated["rows"] == 12 and evaluated["accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert metrics["eval_accuracy"] == state["best_metric"]


def test_lm_objective_on_label_names_reports_accuracy_at_each_evaluation(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("t5", "seq2seq"), "seq2seq", out,
        training={"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps",
                  "save_steps": 2, "metric": "f1", "early_stopping_patience": 5},
    )  # fmt: skip
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    evals = _log_evals(out)
    assert [e["step"] for e in evals] == [2, 4] and all("eval_accuracy" in e for e in evals)
    # eval_loss of the lm objective is the cross-entropy of the correct verbaliser, as without choice batches:
    # `ia3 eval` computes it independently (token-weighted over the 16 rows, which are one evaluation batch)
    from ia3cli.scoring.eval_command import run_eval

    evaluated = run_eval(str(out), recipe_path=None, data=None, split=None, overrides=[], full_precision=False)
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["eval_loss"] == pytest.approx(evaluated["loss"], rel=1e-4) and evaluated["loss"] > 0


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"options": "positive", "answer": 0}, "must be a list of at least 2"),
        ({"options": ["positive"], "answer": 0}, "must be a list of at least 2"),
        ({"options": ["positive", ""], "answer": 0}, "must be a list of at least 2"),
        ({"options": ["positive", "negative"], "answer": 2}, "neither an index 0..1"),
        ({"options": ["positive", "negative"], "answer": "meh"}, "neither an index"),
    ],
)
def test_bad_choice_rows_are_named_by_number(tiny_model, tmp_path: Path, row: dict, words: str) -> None:
    data = tmp_path / "mc.jsonl"
    good = {"text": "fine", "options": ["positive", "negative"], "answer": "positive"}
    data.write_text("\n".join(json.dumps(r) for r in (good, good, {"text": "bad", **row})) + "\n")
    recipe = _choice_recipe(tiny_model("llama", "causal-lm"), tmp_path / "run", data)
    recipe["data"]["eval_split"] = None
    recipe["training"].update(eval_strategy="no", save_strategy="no", metric=None)
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 2, result.output
    assert "row 3" in result.output and words in result.output


def test_templates_are_drawn_per_row_and_epoch_and_reproducibly() -> None:
    from ia3cli.training.row_data import RowDataset

    templates = ["A {text}", "B {text}", "C {text}"]
    ds = RowDataset([{"text": str(i)} for i in range(60)], lambda row, t: {"t": t}, templates=templates, seed=1)
    first = [ds[i]["t"] for i in range(60)]
    ds.set_epoch(1)
    second = [ds[i]["t"] for i in range(60)]
    assert set(first) == set(templates) and first != second
    ds.set_epoch(0)
    assert [ds[i]["t"] for i in range(60)] == first
    same_seed = RowDataset(ds.rows, ds.encode, templates=templates, seed=1)
    other_seed = RowDataset(ds.rows, ds.encode, templates=templates, seed=2)
    assert [same_seed[i]["t"] for i in range(60)] == first != [other_seed[i]["t"] for i in range(60)]
    assert RowDataset(ds.rows, ds.encode)[0]["t"] is None  # no templates: the evaluation template


def test_training_with_several_templates_sees_each_of_them(tiny_model, tmp_path: Path) -> None:
    from ia3cli.training import row_data

    seen: list[str | None] = []
    draw = row_data.RowDataset.template

    def spy(self, index: int) -> str | None:
        seen.append(draw(self, index))
        return seen[-1]

    templates = ["Review: {text}\nSentiment:", "{text}\nsentiment :", "the review : {text} . answer :"]
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run",
        data={"prompt_templates": templates, "prompt_template": None}, training={"max_steps": 8},
    )  # fmt: skip
    monkey = pytest.MonkeyPatch()
    monkey.setattr(row_data.RowDataset, "template", spy)
    try:
        result = _train(tmp_path, recipe)
    finally:
        monkey.undo()
    assert result.exit_code == 0, result.output
    assert set(seen) == {*templates, None}  # None: evaluation rows take the evaluation template
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "eval_accuracy" in saved  # evaluated with the first template (no prompt_template given)


def test_adafactor_is_the_papers_setting(tiny_model, tmp_path: Path) -> None:
    import torch
    from transformers import Trainer
    from transformers.optimization import Adafactor

    from ia3cli.config.load import validate_mapping
    from ia3cli.models import targets
    from ia3cli.training.run import training_arguments
    from ia3cli.tuners import ia3

    made = {}
    for optimizer in ("adafactor", "adamw"):
        recipe = validate_mapping(
            tiny_recipe(
                tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / optimizer,
                training={"optimizer": optimizer, "learning_rate": 3e-3},
            )
        )  # fmt: skip
        plan = targets.resolve(recipe.model, recipe.adapter, "causal-lm", 2)
        model, _ = ia3.build(recipe, plan)
        made[optimizer] = Trainer(model=model, args=training_arguments(recipe, tmp_path / optimizer)).create_optimizer()
    ada = made["adafactor"]
    assert isinstance(ada, Adafactor)
    assert (ada.defaults["relative_step"], ada.defaults["scale_parameter"], ada.defaults["lr"]) == (False, False, 3e-3)
    assert isinstance(made["adamw"], torch.optim.AdamW)


def test_adafactor_trains(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"), "causal-lm", out, training={"optimizer": "adafactor", "objective": "tfew"}
    )
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    vectors = load_file(out / "adapter_model.safetensors")
    assert max((t - 1).abs().max().item() for t in vectors.values()) > 1e-3


# --- adapter.init_from --------------------------------------------------------------------------------------------


def test_init_from_starts_from_the_earlier_runs_vectors(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    first = tmp_path / "first"
    assert _train(tmp_path, tiny_recipe(model_dir, "causal-lm", first), name="a.yaml").exit_code == 0
    earlier = load_file(first / "adapter_model.safetensors")
    assert max((t - 1).abs().max().item() for t in earlier.values()) > 1e-3

    # one step at a negligible learning rate: the vectors stay where init_from put them
    second = tmp_path / "second"
    recipe = tiny_recipe(
        model_dir, "causal-lm", second,
        adapter={"init_from": str(first)}, training={"max_steps": 1, "learning_rate": 1e-12},
    )  # fmt: skip
    result = _train(tmp_path, recipe, name="b.yaml")
    assert result.exit_code == 0, result.output
    assert f"IA3 vectors start from {first}" in result.output
    after = load_file(second / "adapter_model.safetensors")
    assert after.keys() == earlier.keys()
    assert max((after[k] - earlier[k]).abs().max().item() for k in after) < 1e-6


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"adapter": {"target_modules": ["k_proj", "v_proj"], "feedforward_modules": []}}, "target other modules"),
        ({"model": {"task": "seq-cls"}}, "model.task 'causal-lm'"),
        ({"model": {"name": "OTHER"}}, "model.name"),
    ],
)
def test_init_from_refuses_another_base_or_other_targets(tiny_model, tmp_path: Path, change: dict, words: str) -> None:
    first = tmp_path / "first"
    model_dir = tiny_model("llama", "causal-lm")
    assert _train(tmp_path, tiny_recipe(model_dir, "causal-lm", first), name="a.yaml").exit_code == 0
    task = change.get("model", {}).get("task", "causal-lm")
    name = tiny_model("gpt2", task) if "name" in change.get("model", {}) else model_dir  # same folder, other task
    recipe = tiny_recipe(name, task, tmp_path / "second", adapter={"init_from": str(first)})
    for section, values in change.items():
        recipe[section].update({k: v for k, v in values.items() if k != "name"})
    result = _train(tmp_path, recipe, name="b.yaml")
    assert result.exit_code == 2, result.output
    assert "adapter.init_from" in result.output and words in result.output
    assert not (tmp_path / "second" / "adapter_model.safetensors").exists()


# --- the step budget ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "rows", "steps"),
    [
        ({"epochs": 2, "batch_size": 16}, 32, 4),  # the old quick-start: vectors barely move
        ({"epochs": 3, "batch_size": 8, "gradient_accumulation_steps": 2}, 32, 6),
        ({"epochs": 1, "batch_size": 16}, 33, 3),  # the last partial batch counts
        ({"epochs": 1.5, "batch_size": 8}, 64, 12),
        ({"max_steps": 200, "epochs": 1, "batch_size": 8}, 16, 200),  # small data cycled: epochs are ignored
    ],
)
def test_optimizer_steps(training: dict, rows: int, steps: int) -> None:
    section = TrainingSection(**training)
    assert optimizer_steps(section, rows) == steps
    assert (budget_warning(section, rows) is None) == (steps >= 50)


def test_optimizer_steps_equal_what_the_trainer_runs(tiny_model, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run",
        data={"train_samples": 20}, training={"max_steps": None, "epochs": 2, "batch_size": 8},
    )  # fmt: skip
    result = _train(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"]
    assert steps == optimizer_steps(TrainingSection(epochs=2, batch_size=8), 20) == 6
    assert "warning: training.epochs: 20 rows at batch 8" in result.output and "only 6 optimiser steps" in result.output


@pytest.mark.parametrize(("max_steps", "warned"), [(4, True), (60, False)])
def test_validate_warns_about_a_small_budget(tiny_model, tmp_path: Path, max_steps: int, warned: bool) -> None:
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run")
    recipe["training"]["max_steps"] = max_steps
    result = runner.invoke(app, ["validate", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert ("warning: training.max_steps: 4 optimiser steps" in result.output) == warned
