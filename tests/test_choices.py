"""One rule for "is this a choice task" (``Recipe.has_choices``), honoured alike by predict, serve and compare.

A recipe with ``data.choices_column`` ranks each row's own choices: ``ia3 predict`` and ``ia3 serve`` score them as
``ia3 eval`` does (``score_choices``), and ``ia3 compare`` offers zero-shot and in-context learning for it and
compares accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ia3cli.compare.cells import metric_name
from ia3cli.compare.run import applicable
from ia3cli.config.load import load_recipe, validate_mapping
from ia3cli.inference.jobs import softmax
from ia3cli.inference.predict import predict
from ia3cli.inference.rows import make_job
from ia3cli.scoring.evaluation import score_choices
from ia3cli.tuners import ia3
from tests.conftest import tiny_recipe
from tests.test_fewshot import _multiple_choice_data
from tests.test_mixed import make_adapter
from tests.test_serve import serving

CHOICE_DATA = {"label_names": None, "choices_column": "options", "label_column": "answer"}
ROWS = [
    {"text": "a warm clever comedy", "options": ["positive", "negative"]},
    {"text": "ads and upsells sadly", "options": ["the", "negative", "positive"]},
    {"text": "pretty good", "options": ["negative", "positive", "the"]},
]


@pytest.fixture(scope="module")
def choice_run(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("choices")
    data = _multiple_choice_data(tmp / "mc")
    return make_adapter(tmp / "runs", tiny_model("llama", "causal-lm"), "causal-lm", "mc", 7,
                        data={**CHOICE_DATA, "path": str(data)})  # fmt: skip


def _reference(run: Path, rows: list[dict]) -> list[list[float]]:
    recipe = load_recipe(run / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run, recipe)
    with torch.inference_mode():
        return [softmax(s) for s in score_choices(model.eval(), tokenizer, recipe, rows)]


def test_every_command_reads_the_same_rule(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    per_row = tiny_recipe(model_dir, "causal-lm", tmp_path / "r", data=CHOICE_DATA)
    fixed = tiny_recipe(model_dir, "causal-lm", tmp_path / "r")
    chat = tiny_recipe(model_dir, "causal-lm", tmp_path / "r", data={"messages_column": "messages"})
    for raw, choices in ((per_row, True), (fixed, True), (chat, False)):
        recipe = validate_mapping(raw)
        assert recipe.has_choices is choices
        assert metric_name(recipe) == ("accuracy" if choices else "loss")
        assert ("zero-shot" in applicable(recipe)) is choices and ("icl" in applicable(recipe)) is choices


def test_predict_ranks_each_rows_own_choices_from_the_recipes_column(choice_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    predict(choice_run, src, tmp_path / "out.jsonl", batch_size=2, printer=lambda _line: None)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row, expected in zip(out, _reference(choice_run, ROWS), strict=True):
        assert list(row["probabilities"]) == row["options"]
        assert list(row["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert row["prediction"] == row["options"][expected.index(max(expected))]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"text": "no choices here"}, "missing column 'options'"),
        ({"text": "one", "options": ["only"]}, "at least two"),
        ({"text": 5, "options": ["a", "b"]}, "must be a string, got int"),
    ],
)
def test_predict_refuses_rows_that_do_not_fit_the_recipe(choice_run: Path, row: dict, words: str) -> None:
    recipe = load_recipe(choice_run / "recipe.yaml")
    with pytest.raises(ValueError, match=words):
        make_job(0, row, "mc", recipe)


def test_predict_checks_the_type_of_the_text_column(tiny_model, tmp_path: Path) -> None:
    run = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "cls", 3)
    recipe = load_recipe(run / "recipe.yaml")
    with pytest.raises(ValueError, match="column 'text' must be a string, got int"):
        make_job(0, {"text": 5}, "cls", recipe)
    assert make_job(0, {"text": "fine"}, "cls", recipe).kind == "classify"


def test_serve_classifies_over_each_inputs_own_choices(choice_run: Path) -> None:
    with serving(choice_run) as (client, _server):
        answer = client.post("/v1/classify", json={"model": "mc", "input": ROWS})
        assert answer.status_code == 200, answer.text
        for row, got, expected in zip(ROWS, answer.json()["data"], _reference(choice_run, ROWS), strict=True):
            assert list(got["probabilities"]) == row["options"]
            assert list(got["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
            assert got["label"] == row["options"][expected.index(max(expected))]
        missing = client.post("/v1/classify", json={"model": "mc", "input": [{"text": "no choices"}]})
        assert missing.status_code == 422 and "data.choices_column" in missing.text
