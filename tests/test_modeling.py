"""Modeling: auto classes, tokenizers' pad tokens, bitsandbytes configs, trained heads, run reloads, pkg: names."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ia3cli.config.load import load_recipe, validate_mapping
from ia3cli.config.recipe import ModelSection
from ia3cli.errors import RecipeError
from ia3cli.models import loading as modeling
from ia3cli.models.quantization import quantization_config
from ia3cli.scoring.eval_command import run_eval
from ia3cli.training import preflight
from ia3cli.training.model_card import model_card
from ia3cli.tuners import ia3
from tests.conftest import make_run, make_tokenizer, tiny_recipe, write_recipe


@pytest.mark.parametrize(
    ("task", "name"),
    [
        ("seq-cls", "AutoModelForSequenceClassification"),
        ("causal-lm", "AutoModelForCausalLM"),
        ("seq2seq", "AutoModelForSeq2SeqLM"),
    ],
)
def test_auto_class_of_each_task(task: str, name: str) -> None:
    assert modeling.auto_class(task).__name__ == name


def test_auto_class_of_an_unknown_task_names_the_key() -> None:
    with pytest.raises(RecipeError) as err:
        modeling.auto_class("classification")
    assert err.value.key == "model.task" and "seq-cls, causal-lm, seq2seq" in str(err.value)


# --- tokenizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "pad"), [((), "<pad>"), (("pad",), "</s>"), (("pad", "eos"), "<unk>")], ids=["own", "eos", "unk"]
)
def test_a_tokenizer_without_pad_token_pads_with_eos_else_unk(tmp_path: Path, drop: tuple[str, ...], pad: str) -> None:
    tok = make_tokenizer("llama")
    for name in drop:
        setattr(tok, f"{name}_token", None)
    tok.save_pretrained(tmp_path)
    loaded = modeling.load_tokenizer(ModelSection(name=str(tmp_path)))
    assert loaded.pad_token == pad
    assert loaded.pad_token_id == loaded.convert_tokens_to_ids(pad)


def test_a_missing_tokenizer_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        modeling.load_tokenizer(ModelSection(name=str(tmp_path / "nothing-here")))
    assert err.value.key == "model.name" and "cannot load a tokenizer" in str(err.value)


# --- quantization -------------------------------------------------------------------------------------------------

QUANTIZATION = [
    # (model section keys, expected BitsAndBytesConfig attributes; None: no config at all)
    ({}, None),
    ({"quantization": "8bit"}, {"load_in_8bit": True, "load_in_4bit": False}),
    (
        {"quantization": "4bit"},
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.float32,
        },
    ),
    (
        {
            "quantization": "4bit",
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": "bfloat16",
        },
        {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": torch.bfloat16},
    ),
]


@pytest.mark.parametrize(("keys", "expected"), QUANTIZATION, ids=["none", "8bit", "4bit-nf4", "4bit-fp4-bf16"])
def test_quantization_config(keys: dict, expected: dict | None) -> None:
    config = quantization_config(ModelSection(name="m", **keys))
    if expected is None:
        assert config is None
        return
    for attr, value in expected.items():
        assert getattr(config, attr) == value, attr
    # heads train in full (modules_to_save), so bitsandbytes must leave them unquantised
    assert {"classifier", "pre_classifier", "score", "classification_head", "lm_head"} <= set(
        config.llm_int8_skip_modules
    )


# --- trained heads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "extra", "expected"),
    [
        ("distilbert", None, ["pre_classifier", "classifier"]),
        ("bert", None, ["classifier"]),
        ("bert", ["classifier", "bert.pooler.dense"], ["classifier", "bert.pooler.dense"]),
    ],
    ids=["distilbert-two-head-modules", "bert", "bert-recipe-extras-no-duplicates"],
)
def test_seq_cls_heads_are_trained_in_full(
    tmp_path: Path, tiny_model, kind: str, extra: list[str] | None, expected: list[str]
) -> None:
    raw = tiny_recipe(tiny_model(kind, "seq-cls"), "seq-cls", tmp_path / "run", adapter={"modules_to_save": extra})
    recipe = validate_mapping(raw)
    plan = preflight.run(recipe).plan
    assert modeling.modules_to_save("seq-cls", extra, plan.head_modules) == expected == plan.modules_to_save
    model, _ = ia3.build(recipe, plan)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".ia3_l." not in n}
    for module in expected:  # PEFT keeps a trainable copy of each and freezes the original
        assert any(f"{module}.modules_to_save.default." in n for n in trainable), module


def test_causal_lm_trains_no_head_unless_asked(tmp_path: Path, tiny_model) -> None:
    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run")
    recipe = validate_mapping(raw)
    plan = preflight.run(recipe).plan
    assert plan.modules_to_save is None
    assert modeling.modules_to_save("causal-lm", None, ["classifier"]) is None
    assert modeling.modules_to_save("causal-lm", ["lm_head"], ["classifier"]) == ["lm_head"]


# --- reloading a run ----------------------------------------------------------------------------------------------


def test_load_run_model_restores_the_saved_vectors_and_prefers_the_run_tokenizer(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    recipe = load_recipe(run_dir / "recipe.yaml")
    saved = load_file(str(run_dir / "adapter_model.safetensors"))

    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    vectors = {n: p for n, p in model.named_parameters() if ".ia3_l." in n}
    assert len(vectors) == len(saved) == 2 * 3  # k, v and down_proj in 2 layers
    for name, value in saved.items():
        loaded = next(p for n, p in vectors.items() if n.replace(".default", "").endswith(name.split("model.", 1)[1]))
        assert torch.equal(loaded, value), name
    assert not any(p.requires_grad for p in vectors.values())
    trainable, _ = ia3.load_run_model(run_dir, recipe, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if ".ia3_l." in n)

    # The run dir's tokenizer wins over the base's; without one, the base's (with its pad fallback) is used.
    assert tokenizer.name_or_path == str(run_dir)
    for f in run_dir.glob("tokenizer*"):
        f.unlink()
    _, fallback = ia3.load_run_model(run_dir, recipe)
    assert fallback.name_or_path == recipe.model.name and fallback.pad_token == "<pad>"


def test_a_copy_with_another_quantization_loads_full_precision_and_leaves_the_recipe_alone(
    tmp_path: Path, tiny_model
) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", quantization="4bit")
    recipe = load_recipe(run_dir / "recipe.yaml")
    before = recipe.model_dump()
    full = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})
    model, _ = ia3.load_run_model(run_dir, full)
    assert not getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    quantised, _ = ia3.load_run_model(run_dir, recipe)
    assert quantised.get_base_model().is_loaded_in_4bit
    assert recipe.model_dump() == before


# --- pkg: names ---------------------------------------------------------------------------------------------------


@pytest.fixture
def pkg_model(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, list[str]]:
    """A tiny Llama shipped inside an importable package ``tinypkg``; the list records each lookup of it."""
    folder = tmp_path / "site" / "tinypkg"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    shutil.copytree(tiny_model("llama", "causal-lm"), folder / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    lookups: list[str] = []
    find_spec = importlib.util.find_spec

    def counting(name: str, *args: object, **kwargs: object):
        if name == "tinypkg":
            lookups.append(name)
        return find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", counting)
    return "pkg:tinypkg/model", folder / "model", lookups


def test_a_pkg_name_is_resolved_once_and_kept_as_written(pkg_model) -> None:
    name, folder, lookups = pkg_model
    section = ModelSection(name=name, task="causal-lm")
    assert [section.path, section.path] == [str(folder)] * 2 and len(lookups) == 1
    tokenizer = modeling.load_tokenizer(section)
    modeling.load_base(section, pad_token_id=tokenizer.pad_token_id)
    assert len(lookups) == 1 and section.name == name
    other = section.model_copy(update={"name": "some/other-model"})
    assert other.path == "some/other-model" and section.path == str(folder)


def test_a_missing_pkg_is_refused_each_time_it_is_used() -> None:
    section = ModelSection(name="pkg:no_such_package_xyz/model")
    for _ in range(2):
        with pytest.raises(RecipeError, match="pip install no-such-package-xyz") as err:
            _ = section.path
        assert err.value.key == "model.name"


def test_eval_of_a_pkg_base_resolves_it_once(tmp_path: Path, pkg_model) -> None:
    name, _, lookups = pkg_model
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe("unused", "causal-lm", tmp_path / "run"))
    args = {"recipe_path": recipe_file, "data": None, "split": None, "overrides": [], "full_precision": False}
    metrics = run_eval(name, **args)
    assert metrics["kind"] == "base" and metrics["target"] == name and metrics["rows"] == 16
    assert len(lookups) == 1


def test_model_card_names_the_base_as_written_and_loads_it_from_the_folder(tmp_path: Path, pkg_model) -> None:
    name, folder, lookups = pkg_model
    recipe = validate_mapping(tiny_recipe(name, "causal-lm", tmp_path / "run"))
    plan = SimpleNamespace(target_modules=["k_proj"], feedforward_modules=[])
    card = model_card(recipe, plan, {}, {"trainable": 1, "ia3": 1, "total": 2}, {"status": "ok"})
    assert f"base_model: {name}\n" in card
    assert f'AutoModelForCausalLM.from_pretrained("{folder}")' in card
    assert len(lookups) == 1


def test_a_bfloat16_4bit_run_is_evaluated_as_it_was_trained(tiny_model, tmp_path: Path) -> None:
    """The FSDP + QLoRA setting (bfloat16 weights and compute, 4-bit) outside training: the base keeps its
    unquantised weights in float32 as training did, and ``ia3 eval`` runs it (with them in bfloat16, PEFT's 4-bit
    IA3 layers return float32 keys and values next to bfloat16 queries, and attention refuses them)."""
    import json

    from typer.testing import CliRunner

    from ia3cli.cli.app import app
    from tests.conftest import make_run

    model = {"dtype": "bfloat16", "bnb_4bit_compute_dtype": "bfloat16"}
    run = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", quantization="4bit", model=model)
    recipe = load_recipe(run / "recipe.yaml")
    base = modeling.load_base(recipe.model, device="cpu")
    kept = {p.dtype for p in base.parameters() if type(p).__name__ != "Params4bit"}
    assert kept == {torch.float32}, kept
    result = CliRunner().invoke(app, ["eval", str(run), "--split", "validation", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 16
