"""The recipe schema: defaults, overrides, and one failing case per rule, each naming the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ia3cli.config.load import apply_overrides, dump_recipe, load_recipe, parse_override, validate_mapping
from ia3cli.config.paths import resolve_model_path
from ia3cli.config.recipe import SECTIONS, Recipe
from ia3cli.errors import RecipeError

MINIMAL = {"model": {"name": "some/model"}, "data": {"path": "some/data"}}


def _with(**sections: dict) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_minimal_recipe_gets_documented_defaults() -> None:
    r = validate_mapping(_with())
    assert r.model.task == "seq-cls"
    assert r.adapter.target_modules == "auto"
    assert r.training.learning_rate == 3e-3
    assert r.training.weight_decay == 0.0
    assert r.training.warmup_ratio == 0.1
    assert r.training.max_grad_norm == 1.0
    assert r.model.trust_remote_code is False
    assert r.monitor.every_steps == 50 and r.monitor.patience == 3 and r.monitor.on_problem == "warn"
    assert r.metric == "accuracy" and r.num_labels == 2


def test_every_field_has_a_description() -> None:
    for name, section in SECTIONS.items():
        for key, field in section.model_fields.items():
            assert field.description, f"{name}.{key} has no description"


BAD = [
    # (sections, key named in the message, words in the message)
    ({"model": {"taks": "seq-cls"}}, "model.taks", "did you mean 'task'"),
    ({"training": {"learnig_rate": 1e-3}}, "training.learnig_rate", "did you mean 'learning_rate'"),
    ({"trainig": {}}, "trainig", "did you mean 'training'"),
    ({"model": {"task": "classification"}}, "model.task", "seq-cls"),
    ({"model": {"quantization": "3bit"}}, "model.quantization", "4bit"),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate", "valid number"),
    ({"training": {"learning_rate": -1}}, "training.learning_rate", "greater than 0"),
    ({"training": {"epochs": 0}}, "training.epochs", "greater than 0"),
    ({"training": {"batch_size": 0}}, "training.batch_size", "greater than or equal to 1"),
    ({"training": {"warmup_ratio": 1.5}}, "training.warmup_ratio", "less than 1"),
    ({"data": {"max_length": 2}}, "data.max_length", "greater than or equal to 8"),
    ({"model": {"num_labels": 1}}, "model.num_labels", "greater than or equal to 2"),
    ({"monitor": {"on_problem": "panic"}}, "monitor.on_problem", "warn"),
    ({"training": {"eval_strategy": "steps"}}, "training.eval_steps", "required"),
    ({"training": {"save_strategy": "steps", "eval_strategy": "no"}}, "training.save_steps", "required"),
    ({"data": {"eval_split": None}}, "training.eval_strategy", "must be 'no'"),
    ({"training": {"eval_strategy": "epoch", "save_strategy": "no"}}, "training.save_strategy", "must match"),
    (
        {"training": {"eval_strategy": "no", "early_stopping_patience": 2, "load_best_model_at_end": False}},
        "training.early_stopping_patience",
        "needs evaluation",
    ),
    ({"model": {"num_labels": 3}, "data": {"label_names": ["a", "b"]}}, "model.num_labels", "label_names has 2"),
    ({"model": {"task": "causal-lm"}}, "data.target_column", "needs target_column"),
    (
        {"model": {"task": "causal-lm"}, "data": {"target_column": "y"}, "training": {"metric": "accuracy"}},
        "training.metric",
        "must be one of loss",
    ),
    ({"model": {"task": "seq2seq"}, "data": {"messages_column": "m"}}, "data.messages_column", "causal-lm only"),
    # keys starting like a pydantic union tag ("str", "list[", ...) are keys all the same
    ({"training": {"stride": 2}}, "training.stride", "unknown key"),
    ({"model": {"strict": True}}, "model.strict", "unknown key"),
    ({"data": {"string_column": "x"}}, "data.string_column", "unknown key"),
    ({"training": {"report_to": ["tensorboard", 1]}}, "training.report_to.1", "'tensorboard', 'wandb'"),
    ({"data": {"label_names": ["a", 2]}}, "data.label_names.1", "valid string (got 2)"),
    ({"training": {"objective": "tfew"}}, "training.objective", "needs a choice task"),
    (
        {"model": {"task": "causal-lm"}, "data": {"target_column": "y"}, "training": {"objective": "tfew"}},
        "training.objective",
        "label_names or choices_column",
    ),
    (
        {"model": {"task": "causal-lm"}, "data": {"label_names": ["a", "b"], "choices_column": "c"}},
        "data.choices_column",
        "set label_names or choices_column",
    ),
    ({"data": {"choices_column": "c"}}, "data.choices_column", "classification head"),
    ({"training": {"objective": "ul"}}, "training.objective", "'lm' or 'tfew'"),
    ({"training": {"optimizer": "sgd"}}, "training.optimizer", "'adamw' or 'adafactor'"),
    ({"data": {"prompt_templates": []}}, "data.prompt_templates", "at least 1"),
    ({"training": {"ul_weight": -1}}, "training.ul_weight", "greater than or equal to 0"),
]

GOOD = [
    # choice tasks rank-classify at every evaluation, so accuracy / f1 can pick the best checkpoint
    {"model": {"task": "causal-lm"}, "data": {"label_names": ["a", "b"]}, "training": {"metric": "accuracy"}},
    {"model": {"task": "seq2seq"}, "data": {"choices_column": "c"}, "training": {"metric": "eval_f1"}},
    {"model": {"task": "causal-lm"}, "data": {"choices_column": "c"}, "training": {"objective": "tfew"}},
    {"model": {"task": "causal-lm"}, "data": {"label_names": ["a", "b"], "prompt_templates": ["{text}", "Q {text}"]}},
    {"training": {"optimizer": "adafactor"}, "adapter": {"init_from": "runs/earlier"}},
]


@pytest.mark.parametrize("sections", GOOD)
def test_few_shot_settings_that_are_allowed(sections: dict) -> None:
    r = validate_mapping(_with(**sections))
    assert r.training.objective in ("lm", "tfew")


@pytest.mark.parametrize(("sections", "key", "words"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_name_the_key_and_the_fix(sections: dict, key: str, words: str) -> None:
    with pytest.raises(RecipeError) as err:
        validate_mapping(_with(**sections))
    text = str(err.value)
    assert key in text
    assert words in text


# Another accepted literal (e.g. 'all-linear') may sit between 'auto' and the list.
TARGETS_EXPECTED = r"expected 'auto', ('[a-z-]+', )*a list of module-name suffixes or one regex string"
BAD_TARGETS = [
    # (key, value, how the value is shown)
    ("target_modules", [1, 2], "[1, 2]"),
    ("target_modules", ["k_proj", None], "['k_proj', None]"),
    ("target_modules", 5, "5"),
    ("feedforward_modules", {"down_proj": 1}, "a mapping"),
    ("feedforward_modules", True, "True"),
]


@pytest.mark.parametrize(("key", "value", "shown"), BAD_TARGETS, ids=[f"{k}={v!r}" for k, _, v in BAD_TARGETS])
def test_bad_targets_name_the_key_and_every_accepted_form(key: str, value: object, shown: str) -> None:
    with pytest.raises(RecipeError) as err:
        validate_mapping(_with(adapter={key: value}))
    assert err.value.key == f"adapter.{key}"  # one problem, not one per union member
    assert re.fullmatch(f"adapter.{key}: {TARGETS_EXPECTED} \\(got {re.escape(shown)}\\)", str(err.value))


GOOD = [
    # (sections, dotted key, value after validation)
    ({"adapter": {"target_modules": "auto"}}, "adapter.target_modules", "auto"),
    ({"adapter": {"target_modules": ["k_proj", "v_proj"]}}, "adapter.target_modules", ["k_proj", "v_proj"]),
    ({"adapter": {"target_modules": r".*\.(k|v)_proj$"}}, "adapter.target_modules", r".*\.(k|v)_proj$"),
    ({"adapter": {"feedforward_modules": []}}, "adapter.feedforward_modules", []),
    ({"training": {"report_to": "tensorboard"}}, "training.report_to", ["tensorboard"]),
    ({"training": {"report_to": "none"}}, "training.report_to", []),
    ({"training": {"eval_strategy": False, "save_strategy": False}}, "training.eval_strategy", "no"),
    ({"data": {"label_names": ["a", "b"]}}, "data.label_names", ["a", "b"]),
]


@pytest.mark.parametrize(("sections", "key", "value"), GOOD, ids=[f"{g[1]}={g[2]!r}" for g in GOOD])
def test_good_values_pass(sections: dict, key: str, value: object) -> None:
    section, name = key.split(".")
    assert getattr(getattr(validate_mapping(_with(**sections)), section), name) == value


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(RecipeError) as err:
        validate_mapping(_with(model={"taks": 1}, training={"epochs": -1, "batch_size": "x"}))
    text = str(err.value)
    assert "3 problems" in text
    for key in ("model.taks", "training.epochs", "training.batch_size"):
        assert key in text


def test_missing_required_keys() -> None:
    with pytest.raises(RecipeError) as err:
        validate_mapping({"model": {}})
    assert "model.name: required key is missing" in str(err.value)
    assert "data: required key is missing" in str(err.value)


@pytest.mark.parametrize(
    ("item", "path", "value"),
    [
        ("training.learning_rate=0.001", ["training", "learning_rate"], 1e-3),
        ("training.epochs=2", ["training", "epochs"], 2),
        ("model.trust_remote_code=true", ["model", "trust_remote_code"], True),
        ("adapter.target_modules=[k_proj, v_proj]", ["adapter", "target_modules"], ["k_proj", "v_proj"]),
        ("data.eval_split=null", ["data", "eval_split"], None),
        ("data.prompt_template=Q: {text} A:", ["data", "prompt_template"], "Q: {text} A:"),
        ("training.output_dir=runs/x", ["training", "output_dir"], "runs/x"),
    ],
)
def test_overrides_are_yaml_typed(item: str, path: list[str], value: object) -> None:
    assert parse_override(item) == (path, value)


@pytest.mark.parametrize("item", ["noequals", "toplevel=1", "a.b.c=1"])
def test_malformed_overrides_are_refused(item: str) -> None:
    with pytest.raises(RecipeError):
        parse_override(item)


def test_override_of_unknown_section_suggests_one() -> None:
    with pytest.raises(RecipeError, match="did you mean 'training'"):
        apply_overrides({}, ["trainng.epochs=1"])


def test_load_recipe_applies_overrides_and_resolves_data_beside_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "x", "label": 0}\n')
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "m"}, "data": {"path": "data.jsonl"}, "training": None}))
    r = load_recipe(path, ["training.learning_rate=5e-3", "model.quantization=4bit"])
    assert r.training.learning_rate == 5e-3
    assert r.model.quantization == "4bit"
    assert Path(r.data.path) == (tmp_path / "data.jsonl").resolve()


def test_one_rule_for_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs (model.name, data.path, adapter.init_from): the working directory, else beside the recipe.
    Outputs (training.output_dir): the working directory."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in ("base", "data", "earlier-run"):
        (project / folder).mkdir(parents=True)
    elsewhere.mkdir()
    raw = {
        "model": {"name": "base"},
        "adapter": {"init_from": "earlier-run"},
        "data": {"path": "data"},
        "training": {"output_dir": "runs/x"},
    }
    path = project / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(elsewhere)
    r = load_recipe(path)
    assert r.model.name == str((project / "base").resolve())
    assert r.adapter.init_from == str((project / "earlier-run").resolve())
    assert r.data.path == str((project / "data").resolve())
    assert r.training.output_dir == "runs/x"
    (elsewhere / "data").mkdir()  # the working directory comes first
    assert load_recipe(path).data.path == "data"
    hub = load_recipe(path, ["model.name=org/model"])  # a hub id is never taken for a path
    assert hub.model.name == "org/model"


def test_bare_no_in_yaml_means_the_strategy_no(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: m}\ndata: {path: d}\ntraining: {eval_strategy: no, save_strategy: no}\n")
    r = load_recipe(path, ["training.save_strategy=no"])
    assert r.training.eval_strategy == "no" and r.training.save_strategy == "no"


def test_scientific_notation_in_yaml_is_a_float(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: m}\ndata: {path: d}\ntraining: {learning_rate: 3e-3}\n")
    assert load_recipe(path).training.learning_rate == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: [unclosed\n", "not valid YAML (line"),
        ("- a\n- b\n", "must be a mapping"),
        ("model: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=words.replace("(", r"\(")):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_dump_roundtrips() -> None:
    r = validate_mapping(_with(training={"learning_rate": 1e-2}, adapter={"target_modules": ["k", "v"]}))
    again = Recipe.model_validate(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_pkg_model_names_resolve_to_the_installed_package_folder() -> None:
    folder = Path(resolve_model_path("pkg:yaml"))
    assert (folder / "__init__.py").is_file()
    assert resolve_model_path("org/model") == "org/model"
    with pytest.raises(RecipeError, match="pip install no-such-package"):
        resolve_model_path("pkg:no_such_package/model")
    with pytest.raises(RecipeError, match="not a folder inside package"):
        resolve_model_path("pkg:yaml/no-such-dir")
