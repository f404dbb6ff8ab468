"""``adapter.method``: LoRA targets from the module table's roles, the head-only and full methods."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ia3cli.config.recipe import AdapterSection, ModelSection
from ia3cli.errors import RecipeError
from ia3cli.models import targets
from ia3cli.tuners import baselines as methods


def _plan(tiny_model, kind: str, task: str):
    model = ModelSection(name=str(tiny_model(kind, task)), task=task)
    return targets.resolve(model, AdapterSection(), task)


def _targeted(plan, spec) -> list[str]:
    rows = methods.lora_target_rows(plan, spec)
    regex = methods._regex([r["pattern"] for r in rows])
    return sorted({name.rsplit(".", 1)[-1] for row in plan.modules for name in [row["pattern"]] if re.fullmatch(
        regex, name.replace("*", "0"))})  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "task", "spec", "expected"),
    [
        ("llama", "causal-lm", "attention", ["q_proj", "v_proj"]),
        ("bert", "seq-cls", "attention", ["query", "value"]),
        ("gpt2", "causal-lm", "attention", ["c_attn"]),  # keys and values fused with queries
        ("t5", "seq2seq", "attention", ["q", "v"]),
        (
            "llama",
            "causal-lm",
            "all-linear",
            ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        ),
        ("bert", "seq-cls", ["key"], ["key"]),
    ],
)
def test_lora_targets_come_from_roles(tiny_model, kind: str, task: str, spec, expected: list[str]) -> None:
    assert _targeted(_plan(tiny_model, kind, task), spec) == expected


def test_lora_all_linear_leaves_out_the_head(tiny_model) -> None:
    plan = _plan(tiny_model, "bert", "seq-cls")
    patterns = [r["pattern"] for r in methods.lora_target_rows(plan, "all-linear")]
    assert not any(p.startswith("classifier") for p in patterns)
    assert len(patterns) == 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense


def test_lora_targets_that_match_nothing_name_the_key(tiny_model) -> None:
    with pytest.raises(RecipeError, match="adapter.lora_targets: selects no linear module"):
        methods.lora_target_rows(_plan(tiny_model, "llama", "causal-lm"), ["nonexistent"])


def test_lora_parameter_count_matches_peft(tiny_model, tmp_path: Path) -> None:
    from ia3cli.config.load import validate_mapping
    from ia3cli.models import loading as modeling
    from ia3cli.tuners import ia3
    from tests.conftest import tiny_recipe

    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path, adapter={"method": "lora", "lora_r": 2})
    recipe = validate_mapping(raw)
    plan = targets.resolve(recipe.model, recipe.adapter, "causal-lm")
    model, _ = ia3.build(recipe, plan)
    assert modeling.count_parameters(model)["trainable"] == _lora_params(plan, "attention", 2) > 0


def test_head_method_trains_only_the_head(tiny_model, tmp_path: Path) -> None:
    from ia3cli.config.load import validate_mapping
    from ia3cli.tuners import ia3
    from tests.conftest import tiny_recipe

    recipe = validate_mapping(
        tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", tmp_path, adapter={"method": "head"})
    )
    plan = targets.resolve(recipe.model, recipe.adapter, "seq-cls")
    model, _ = ia3.build(recipe, plan)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]


def _lora_params(plan, spec, r: int) -> int:
    """LoRA parameters on the chosen modules, counted independently: ``r * (in + out)`` per module."""
    return sum(
        r * (row["in_features"] + row["out_features"]) * row["count"] for row in methods.lora_target_rows(plan, spec)
    )
