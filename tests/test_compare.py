"""``ia3 compare`` on tiny models: every method of every task, the same rows for every method, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.compare import cells as compare_cells
from ia3cli.compare import run as compare
from ia3cli.compare.summary import recommendation, table
from ia3cli.config.load import validate_mapping
from ia3cli.data import icl
from ia3cli.data.encoding import encode_causal, prompt_text
from ia3cli.errors import Ia3Error, RecipeError
from tests.conftest import SENTIMENT, tiny_recipe, write_recipe

runner = CliRunner()
STEPS = {"max_steps": 2, "batch_size": 4}


def _recipe(tiny_model, tmp_path: Path, kind: str, task: str, **sections: dict):
    raw = tiny_recipe(tiny_model(kind, task), task, tmp_path / "unused", **sections)
    raw["training"].update(STEPS)
    raw["data"]["eval_samples"] = 12
    return raw


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def seq_cls_compare(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI comparison of every seq-cls method, N=8, two seeds."""
    tmp = tmp_path_factory.mktemp("cmp-seq-cls")
    path = write_recipe(tmp / "r.yaml", _recipe(tiny_model, tmp, "bert", "seq-cls"))
    out = tmp / "out"
    result = runner.invoke(app, ["compare", str(path), "--rows", "8", "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (out / "cli-output.txt").write_text(result.output)
    return out


def test_seq_cls_compare_reports_every_method(seq_cls_compare: Path) -> None:
    out = seq_cls_compare
    saved = json.loads((out / "compare.json").read_text())
    assert saved["methods"] == ["ia3", "ia3-all", "lora", "full", "head"]
    assert {c["cell"] for c in saved["cells"]} == {f"{m}-n8-s{s}" for m in saved["methods"] for s in (0, 1)}
    by_method = {c["method"]: c for c in saved["cells"] if c["seed"] == 0}
    for cell in saved["cells"]:
        assert cell["steps"] == 2 and cell["peak_rss_mib"] > 0
        assert cell["metric"] * 12 == pytest.approx(round(cell["metric"] * 12))  # an accuracy on the 12 eval rows
    lrs = {m: c["lr"] for m, c in by_method.items()}
    assert lrs == {"ia3": 1e-2, "ia3-all": 1e-2, "lora": 5e-4, "full": 5e-5, "head": 1e-3}
    params = {m: c["params"] for m, c in by_method.items()}
    assert params["head"] < params["ia3"] < params["ia3-all"] < params["lora"] < params["full"]
    assert by_method["full"]["bytes"] > 100 * by_method["ia3"]["bytes"] > 0
    assert by_method["head"]["bytes"] == 4 * params["head"]
    text = (out / "cli-output.txt").read_text()
    assert "[10/10]" in text and "ETA" in text and saved["recommendation"] in text
    for method in saved["methods"]:
        assert any(line.startswith(method + " ") for line in text.splitlines()), method
    assert (out / "compare.png").stat().st_size > 10_000


def test_every_method_sees_the_same_rows(seq_cls_compare: Path) -> None:
    from ia3cli.config.load import load_recipe
    from ia3cli.data.sources import load_split, sample

    saved = json.loads((seq_cls_compare / "compare.json").read_text())
    train = load_split(validate_mapping({"model": {"name": "x"}, "data": {"path": str(SENTIMENT)}}).data, "train")
    evals = {json.dumps(r, sort_keys=True) for r in _jsonl(seq_cls_compare / "data" / "n8-s0" / "validation.jsonl")}
    for seed in (0, 1):
        cells = [c for c in saved["cells"] if c["seed"] == seed]
        folders = set()
        for cell in cells:
            run = load_recipe(Path(cell["run_dir"]) / "recipe.yaml")  # what the run really trained on
            folders.add(run.data.path)
            assert run.training.seed == seed and run.data.train_samples is None
        assert len(folders) == 1
        folder = Path(folders.pop())
        assert _jsonl(folder / "train.jsonl") == list(sample(train, 8, seed))
        assert {json.dumps(r, sort_keys=True) for r in _jsonl(folder / "validation.jsonl")} == evals
    assert _jsonl(seq_cls_compare / "data/n8-s0/train.jsonl") != _jsonl(seq_cls_compare / "data/n8-s1/train.jsonl")


def test_every_trained_cell_evaluates_and_merge_says_what_it_can(seq_cls_compare: Path, tmp_path: Path) -> None:
    from ia3cli.inference.merge import merge
    from ia3cli.scoring.eval_command import run_eval

    saved = json.loads((seq_cls_compare / "compare.json").read_text())
    for cell in (c for c in saved["cells"] if c["seed"] == 0):
        metrics = run_eval(cell["run_dir"], recipe_path=None, data=None, split=None, overrides=[], full_precision=False)
        assert metrics["rows"] == 12
        assert metrics["accuracy"] == pytest.approx(cell["metric"]), cell["method"]
    cells = {c["method"]: c["run_dir"] for c in saved["cells"] if c["seed"] == 0}
    report = merge(Path(cells["lora"]), tmp_path / "lora-merged")
    assert report["max_abs_diff"] <= report["tolerance"]
    for method in ("full", "head"):
        with pytest.raises(Ia3Error, match="already a full model"):
            merge(Path(cells[method]), tmp_path / f"{method}-merged")
        assert not (tmp_path / f"{method}-merged").exists()


def test_resume_trains_nothing_and_keeps_results(seq_cls_compare: Path) -> None:
    saved = json.loads((seq_cls_compare / "compare.json").read_text())
    path = seq_cls_compare.parent / "r.yaml"
    result = runner.invoke(
        app, ["compare", str(path), "--rows", "8", "--seeds", "2", "--out", str(seq_cls_compare), "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert "10 cells (10 done)" in result.output and "ETA" not in result.output
    again = json.loads((seq_cls_compare / "compare.json").read_text())
    assert again["cells"] == saved["cells"]
    changed = runner.invoke(
        app,
        ["compare", str(path), "--rows", "8", "--seeds", "2", "--out", str(seq_cls_compare), "--resume"]
        + ["--set", "training.max_steps=3"],
    )
    assert changed.exit_code == 2 and "different recipe" in changed.output
    fresh = runner.invoke(app, ["compare", str(path), "--rows", "8", "--out", str(seq_cls_compare)])
    assert fresh.exit_code == 2 and "--resume" in fresh.output


def test_causal_lm_compare_with_zero_shot_and_icl(tiny_model, tmp_path: Path) -> None:
    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "llama", "causal-lm"))
    assert compare.applicable(recipe) == ["zero-shot", "icl", "ia3", "ia3-all", "lora", "full"]
    lines: list[str] = []
    result = compare.run(recipe, None, [8], 1, tmp_path / "out", printer=lines.append)
    cells = {c["method"]: c for c in result.cells}
    assert set(cells) == set(compare.applicable(recipe))
    assert [c["method"] for c in result.cells][:2] == ["zero-shot", "icl"]  # base cells first, then released
    assert cells["zero-shot"]["n"] == 0 and cells["zero-shot"]["params"] == 0
    assert 1 <= cells["icl"]["k"] <= 8 and cells["icl"]["steps"] == 0
    for method in ("ia3", "ia3-all", "lora", "full"):
        assert cells[method]["steps"] == 2 and cells[method]["metric"] is not None
    assert result.recommendation in lines and result.table in lines


def test_seq2seq_compare(tiny_model, tmp_path: Path) -> None:
    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "t5", "seq2seq"))
    assert compare.applicable(recipe) == ["zero-shot", "ia3", "ia3-all", "lora", "full"]
    result = compare.run(recipe, ["zero-shot", "lora"], [8], 1, tmp_path / "out", printer=lambda _: None)
    assert [c["method"] for c in result.cells] == ["zero-shot", "lora"]
    assert result.cells[1]["params"] > 0 and result.cells[1]["bytes"] > 0


def test_sweep_selects_on_rows_of_the_training_sample(tiny_model, tmp_path: Path) -> None:
    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "bert", "seq-cls"))
    result = compare.run(recipe, ["ia3"], [8], 1, tmp_path / "out", sweep=True, printer=lambda _: None)
    cell = result.cells[0]
    assert list(cell["sweep"]) == ["0.003", "0.01", "0.03"]
    assert f"{cell['lr']:g}" in cell["sweep"]
    carve = tmp_path / "out" / "sweep" / "n8-s0"
    sample = _jsonl(tmp_path / "out" / "data" / "n8-s0" / "train.jsonl")
    assert _jsonl(carve / "validation.jsonl") + _jsonl(carve / "train.jsonl") == sample


def test_icl_prompt_holds_demonstrations_in_order(tiny_model, tmp_path: Path) -> None:
    from ia3cli.models import loading as modeling

    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "llama", "causal-lm"))
    tok = modeling.load_tokenizer(recipe.model)
    model = modeling.load_recipe_base(recipe, tok)
    rows = [{"text": "great {film}", "label": 1}, {"text": "dull", "label": 0}, {"text": "fine", "label": 1}]
    new, k = icl.recipe_with_demonstrations(recipe, tok, model, rows, rows[:1], k=2)
    prompt = new.data.prompt_template.format(text="nice")
    assert k == 2
    demos = "Review: great {film}\nSentiment: positive</s>\n\nReview: dull\nSentiment: negative</s>\n\n"
    assert prompt == demos + "Review: nice\nSentiment:"
    fitted_recipe, fitted = icl.recipe_with_demonstrations(recipe, tok, model, rows * 50, rows)
    assert 3 < fitted < 150  # as many as fit in 4 x max_length (32) tokens, not all 150
    for row in rows:  # no prompt is cut: every row starts with all k demonstrations
        for choice in recipe.data.label_names:
            prompt = prompt_text(row, fitted_recipe.data)
            whole = encode_causal(tok, prompt, choice, 10**9)
            assert encode_causal(tok, prompt, choice, fitted_recipe.data.max_length) == whole


@pytest.mark.parametrize(
    ("task", "kind", "args", "message"),
    [
        ("seq-cls", "bert", ["--methods", "ia3,bogus"], "unknown method 'bogus'"),
        ("seq-cls", "bert", ["--methods", "icl"], "'icl' does not apply to task 'seq-cls'"),
        ("seq-cls", "bert", ["--methods", "zero-shot"], "'zero-shot' does not apply"),
        ("causal-lm", "llama", ["--methods", "head"], "'head' does not apply to task 'causal-lm'"),
        ("seq-cls", "bert", ["--rows", "8,1000"], "N=1000 but the training split 'train'"),
        ("seq-cls", "bert", ["--rows", "8,x"], "not a comma-separated list"),
        ("seq-cls", "bert", ["--lr", "lora"], "'lora' is not METHOD=VALUE"),
        ("seq-cls", "bert", ["--lr", "icl=1e-3"], "'icl=1e-3' is not METHOD=VALUE"),
        ("seq-cls", "bert", ["--lora-targets", "mlp"], "'mlp' is not attention or all-linear"),
        ("seq-cls", "bert", ["--set", "data.eval_split=null", "--set", "training.eval_strategy=no"], "eval_split"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(
    tiny_model, tmp_path: Path, task: str, kind: str, args: list[str], message: str
) -> None:
    path = write_recipe(tmp_path / "r.yaml", _recipe(tiny_model, tmp_path, kind, task))
    result = runner.invoke(app, ["compare", str(path), "--rows", "8", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_out_that_ia3cli_did_not_write_is_never_replaced(tiny_model, tmp_path: Path) -> None:
    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "bert", "seq-cls"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(Ia3Error):
            compare.run(recipe, ["head"], [8], 1, out, printer=lambda _: None, **flags)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_head_method_is_seq_cls_only_in_the_schema(tiny_model, tmp_path: Path) -> None:
    raw = _recipe(tiny_model, tmp_path, "llama", "causal-lm", adapter={"method": "head"})
    with pytest.raises(RecipeError, match="adapter.method: 'head' trains a classification head"):
        validate_mapping(raw)
    raw = _recipe(tiny_model, tmp_path, "bert", "seq-cls", adapter={"method": "full"})
    raw["model"]["quantization"] = "4bit"
    with pytest.raises(RecipeError, match="'full' cannot train a 4bit base"):
        validate_mapping(raw)


def test_lora_cells_take_the_recipes_lora_keys_unless_flags_override_them() -> None:
    raw = {"model": {"name": "x"}, "data": {"path": "d"}, "adapter": {"lora_r": 2, "lora_targets": "all-linear"}}
    recipe = validate_mapping(raw)
    assert compare.lora_settings(recipe, None, None) == {"lora_r": 2, "lora_targets": "all-linear"}
    assert compare.lora_settings(recipe, 16, "attention") == {"lora_r": 16, "lora_targets": "attention"}
    plain = validate_mapping({"model": {"name": "x"}, "data": {"path": "d"}})
    assert compare.lora_settings(plain, None, None) == {"lora_r": 8, "lora_targets": "attention"}  # PEFT's rank


def test_step_budget_rule() -> None:
    raw = {"model": {"name": "x"}, "data": {"path": "d"}, "training": {"epochs": 10, "batch_size": 16}}
    recipe = validate_mapping(raw)
    assert [compare.step_budget(recipe, n) for n in (16, 64, 256)] == [50, 50, 160]
    raw["training"]["max_steps"] = 7
    assert compare.step_budget(validate_mapping(raw), 256) == 7


def _cells(spec: dict[str, tuple[list[float], int]], n: int = 64) -> list[dict]:
    return [
        {"method": m, "n": n, "metric": v, "bytes": b, "params": b // 4, "seconds": 1.0, "peak_rss_mib": 100.0}
        for m, (vals, b) in spec.items()
        for v in vals
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"ia3": ([0.80, 0.81], 60_000), "lora": ([0.81, 0.81], 300_000)},
            "ia3 (0.805) is within 0.005 of lora (0.810) with a 5x smaller adapter: ia3.",
        ),
        ({"ia3": ([0.70, 0.70], 60_000), "lora": ([0.80, 0.80], 300_000)}, "At N=64 lora is best (0.800; next ia3"),
        ({"icl": ([0.90, 0.90], 0), "ia3": ([0.905, 0.905], 60_000)}, "with nothing trained or stored: icl."),
        ({"ia3": ([0.80, 0.80], 60_000), "full": ([0.805, 0.805], 90_000_000)}, "1500x smaller adapter: ia3."),
        # full's lead (0.10) is larger than its standard error (0.12 / sqrt(3) = 0.07): full, despite the noise
        ({"ia3": ([0.59] * 3, 60_000), "full": ([0.69, 0.80, 0.56], 90_000_000)}, "At N=64 full is best (0.683"),
        ({"ia3": ([0.59] * 3, 60_000), "full": ([0.60, 0.80, 0.56], 90_000_000)}, "ia3 (0.590) is within 0.063"),
    ],
)
def test_recommendation_follows_the_numbers(spec: dict, expected: str) -> None:
    assert expected in recommendation(_cells(spec), list(spec), [16, 64])


def test_table_shows_mean_and_std_per_n() -> None:
    cells = _cells({"ia3": ([0.8, 0.9], 60_000)}) + _cells({"ia3": ([0.5], 60_000)}, n=16)
    cells += [{"method": "zero-shot", "n": 0, "metric": 0.6, "bytes": 0, "params": 0, "seconds": 2.0,
               "peak_rss_mib": 50.0}]  # fmt: skip
    text = table(cells, ["zero-shot", "ia3"], [16, 64], "accuracy")
    zero, ia3 = (line for line in text.splitlines() if line.startswith(("zero-shot", "ia3")))
    assert "0.600 ± 0.000  0.600 ± 0.000" in zero and "0 B" in zero
    assert "0.500 ± 0.000  0.850 ± 0.071" in ia3 and "15,000" in ia3 and "60.0 KB" in ia3


def test_recipe_keys_reach_the_cell(tiny_model, tmp_path: Path) -> None:
    recipe = validate_mapping(_recipe(tiny_model, tmp_path, "llama", "causal-lm"))
    cell = compare_cells.cell_recipe(
        recipe, "lora", 8, 1, folder=tmp_path, run_dir=tmp_path / "c", lr=1e-3, steps=9,
        lora={"lora_r": 2, "lora_targets": "all-linear"},
    )  # fmt: skip
    assert (cell.adapter.method, cell.adapter.lora_r, cell.adapter.lora_targets) == ("lora", 2, "all-linear")
    assert (cell.training.max_steps, cell.training.learning_rate, cell.training.seed) == (9, 1e-3, 1)
    assert cell.training.eval_strategy == "no" and not cell.training.load_best_model_at_end
    all_linear = compare_cells.cell_recipe(
        recipe, "ia3-all", 8, 0, folder=tmp_path, run_dir=tmp_path, lr=1, steps=1, lora={}
    )
    assert all_linear.adapter.target_modules == "all-linear" and all_linear.adapter.method == "ia3"
    assert yaml.safe_load(yaml.safe_dump(cell.model_dump(mode="json")))["data"]["path"] == str(tmp_path)
