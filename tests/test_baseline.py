"""Did training help: the step-0 baseline, the majority-class rate, and the two outcome findings.

The rules are checked on hand-made histories (the noise rule exactly); tiny real models check that a run which
cannot learn (learning rate 1e-9) is told so, that one-class labels meet the majority rule, and that ``--resume``
keeps the baseline without evaluating step 0 again.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.compare.summary import recommendation, table
from ia3cli.config.load import validate_mapping
from ia3cli.scoring import chance
from ia3cli.training import health, outcome
from tests.conftest import SENTIMENT, tiny_recipe, write_recipe

runner = CliRunner()


# ---- the standard-error rule ----------------------------------------------------------------------------------


def test_standard_error_is_the_binomial_one() -> None:
    assert chance.standard_error(0.5, 100) == pytest.approx(0.05)
    assert chance.standard_error(0.9, 36) == pytest.approx(math.sqrt(0.9 * 0.1 / 36))
    assert chance.standard_error(1.0, 10) == 0.0 and chance.standard_error(0.5, 0) == math.inf
    # the gain's noise: both accuracies' errors added in quadrature
    assert chance.gain_noise(0.5, 0.6, 100) == pytest.approx(math.sqrt((0.25 + 0.24) / 100))


@pytest.mark.parametrize(
    ("value", "reference", "rows", "beats"),
    [
        (0.55, 0.50, 100, False),  # +0.05 < one standard error of the gain (0.0705)
        (0.58, 0.50, 100, True),  # +0.08 > 0.0698
        (0.60, 0.50, 16, False),  # +0.10 on 16 rows is noise (0.18)
        (0.75, 0.50, 16, True),  # +0.25 > 0.166
        (0.50, 0.50, 1000, False),  # no gain is never a gain
        (0.40, 0.44, 55, False),  # the example: the trained adapter is worse than the base
    ],
)
def test_beats_needs_more_than_one_standard_error(value: float, reference: float, rows: int, beats: bool) -> None:
    assert chance.beats(value, reference, rows) is beats


def test_majority_rate_of_rows() -> None:
    assert chance.majority_rate([0, 1, 1, 1]) == 0.75 and chance.majority_rate([]) is None
    raw = {"model": {"name": "x", "task": "seq-cls"}, "data": {"path": "d", "label_names": ["neg", "pos"]}}
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": 0}, {"text": "c", "label": "pos"}]
    assert chance.majority_of(rows, validate_mapping(raw)) == pytest.approx(2 / 3)
    choice = {"model": {"name": "x", "task": "causal-lm"}, "data": {"path": "d", "choices_column": "options"}}
    rows = [{"text": "t", "options": ["a", "b", "c"], "label": i} for i in (2, 2, 0, 1)]
    assert chance.majority_of(rows, validate_mapping(choice)) == 0.5  # always answering the third choice
    plain = {"model": {"name": "x", "task": "causal-lm"}, "data": {"path": "d", "target_column": "y"}}
    assert chance.majority_of([{"text": "t", "y": "z"}], validate_mapping(plain)) is None


# ---- the findings on hand-made histories -----------------------------------------------------------------------


def _history(*accuracies: float, start: int = 0) -> list[dict]:
    """Evaluations at steps start, start+10, ...: the first (step 0) is the baseline."""
    return [{"step": start + 10 * i, "eval_accuracy": a, "eval_loss": 1.0 - a} for i, a in enumerate(accuracies)]


def _codes(history: list[dict], rows: int = 100, majority: float | None = 0.5) -> list[str]:
    found = outcome.findings(history, rows, majority, steps=40, learning_rate=3e-3, task="seq-cls")
    return [f["code"] for f in found]


@pytest.mark.parametrize(
    ("name", "history", "rows", "majority", "codes"),
    [
        ("a clear gain", _history(0.50, 0.70, 0.80), 100, 0.5, []),
        ("a gain smaller than its noise", _history(0.60, 0.62, 0.65), 100, 0.5, ["no_gain_over_base"]),
        ("worse than the base and the majority", _history(0.44, 0.40, 0.38), 55, 0.56,
         ["no_gain_over_base", "below_majority_class"]),
        ("a gain, but only up to the majority rate", _history(0.20, 0.50, 0.60), 100, 0.60,
         ["below_majority_class"]),
        ("the best evaluation counts, not the last", _history(0.50, 0.80, 0.55), 100, 0.5, []),
        ("no step-0 evaluation: only the majority rule", _history(0.40, 0.45, start=10), 100, 0.5,
         ["below_majority_class"]),
        ("no classes: no majority rule", _history(0.5, 0.52), 100, None, ["no_gain_over_base"]),
        ("no evaluation after step 0", _history(0.5), 100, 0.5, []),
    ],
)  # fmt: skip
def test_outcome_findings(name: str, history: list, rows: int, majority: float | None, codes: list) -> None:
    assert _codes(history, rows, majority) == codes


def test_outcome_messages_give_numbers_causes_in_order_and_commands() -> None:
    found = outcome.findings(_history(0.44, 0.40), 55, 0.56, steps=60, learning_rate=1e-9, task="causal-lm")
    gain, below = found
    noise = chance.gain_noise(0.44, 0.40, 55)
    assert f"gain -0.040, one standard error {noise:.3f} on 55 rows" in gain["message"]
    assert "at or below 0.560" in below["message"]
    for f in found:
        text = f["message"]
        order = [text.index(w) for w in ("too few optimiser steps (60 run)", "1e-09", "label words", "too small")]
        assert order == sorted(order)
        assert "--set training.max_steps=240" in text and "ia3 compare RECIPE --methods zero-shot,icl" in text
        assert f["group"] is None and f["step"] == 60
    report = health.report(found, ["k"], {}, 60, None, 1.0)
    assert health.summary_line(report).startswith("health: warning after 60 steps: no_gain_over_base, below_majority")


def test_baseline_is_the_step_0_evaluation_only() -> None:
    history = [{"step": 0, "loss": 2.0}, *_history(0.5, 0.7), {"step": 0, "eval_accuracy": 0.1}]
    history[1]["eval_runtime"] = 0.3
    assert outcome.baseline_metrics(history) == {"accuracy": 0.5, "loss": 0.5}
    assert outcome.baseline_metrics(_history(0.5, start=10)) == {}
    line = outcome.gain_line({"baseline_accuracy": 0.5, "eval_accuracy": 0.75, "majority_accuracy": 0.5}, "accuracy")
    assert line == "baseline: accuracy 0.5000 at step 0 -> 0.7500 (+0.2500) | majority class 0.5000"


# ---- ia3 compare: the majority row and the verdict --------------------------------------------------------------


def _cell(method: str, value: float, stored: int) -> dict:
    return {"method": method, "n": 16, "metric": value, "bytes": stored, "params": 1, "seconds": 1.0,
            "peak_rss_mib": 1.0}  # fmt: skip


def test_compare_shows_the_majority_row_and_says_when_nothing_beats_it() -> None:
    cells = [_cell("zero-shot", 0.44, 0), _cell("ia3", 0.40, 9), _cell("lora", 0.46, 99)]
    text = table(cells, ["zero-shot", "ia3", "lora"], [16], "accuracy", majority=0.56)
    assert text.splitlines()[-1].split()[:3] == ["majority", "class", "0.560"]
    verdict = recommendation(cells, ["zero-shot", "ia3", "lora"], [16], True, majority=0.56, eval_rows=55)
    assert "No method beats the majority class (0.560) on these 55 rows" in verdict
    assert "No trained method beats zero-shot (0.440)" in verdict
    good = [_cell("zero-shot", 0.44, 0), _cell("ia3", 0.80, 9)]
    assert "No " not in recommendation(good, ["zero-shot", "ia3"], [16], True, majority=0.56, eval_rows=55)


# ---- tiny real runs ----------------------------------------------------------------------------------------------


def _seq_cls(tiny_model, out: Path, **training) -> dict:
    settings = {"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2}
    return tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", out, training={**settings, **training})


@pytest.fixture(scope="module")
def frozen(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny seq-cls run at learning rate 1e-9: nothing can be learned."""
    tmp = tmp_path_factory.mktemp("frozen")
    recipe = _seq_cls(tiny_model, tmp / "run", learning_rate=1e-9)
    result = runner.invoke(app, ["train", str(write_recipe(tmp / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return tmp / "run", result.output


def test_a_run_that_cannot_learn_gets_no_gain_over_base(frozen) -> None:
    out, output = frozen
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline_accuracy"] == metrics["eval_accuracy"]  # lr 1e-9 moves nothing
    assert {"baseline_loss", "baseline_f1"} <= metrics.keys() and metrics["rows_evaluated"] == 16
    codes = [f["code"] for f in json.loads((out / "health.json").read_text())["findings"]]
    assert "no_gain_over_base" in codes
    assert "warning: no_gain_over_base: best accuracy" in output
    summary = next(line for line in output.splitlines() if line.startswith("health: "))
    assert "no_gain_over_base" in summary and "no_gain_over_base (all groups)" not in summary
    card = (out / "README.md").read_text()
    assert "- `no_gain_over_base`: best accuracy" in card and "| baseline_accuracy |" in card


def test_console_shows_the_baseline_and_majority_once(frozen) -> None:
    out, output = frozen
    evals = [line for line in output.splitlines() if line.startswith("eval ")]
    assert [line.split()[1] for line in evals] == ["0/4", "2/4", "4/4"]
    majority = json.loads((out / "metrics.json").read_text())["majority_accuracy"]
    assert evals[0].endswith(f"majority {majority:.4f}  <- baseline before training")
    assert sum("majority" in line for line in evals) == 1
    assert f"majority class {majority:.4f}" in output and "baseline: accuracy " in output
    listed = runner.invoke(app, ["runs", str(out)])
    assert "(+0.0000 vs step 0)" in listed.output
    evaluated = runner.invoke(app, ["eval", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["majority_accuracy"] == majority


def test_resume_keeps_the_baseline_and_does_not_evaluate_step_0_again(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", _seq_cls(tiny_model, out))
    first = runner.invoke(app, ["train", str(path)])
    assert first.exit_code == 0, first.output
    baseline = json.loads((out / "metrics.json").read_text())["baseline_accuracy"]
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if killed after the checkpoint at step 2

    resumed = runner.invoke(app, ["train", str(path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    evals = [line.split()[1] for line in resumed.output.splitlines() if line.startswith("eval ")]
    assert evals == ["4/4"]  # step 2 was before the checkpoint, step 0 is not repeated
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r["step"] == 0 and "eval_accuracy" in r) == 1
    assert json.loads((out / "metrics.json").read_text())["baseline_accuracy"] == baseline


def test_eval_on_start_false_evaluates_no_baseline(tiny_model, tmp_path: Path) -> None:
    recipe = _seq_cls(tiny_model, tmp_path / "run", eval_on_start=False, save_strategy="no",
                      load_best_model_at_end=False)  # fmt: skip
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in result.output.splitlines() if line.startswith("eval ")] == ["2/4", "4/4"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not any(k.startswith("baseline_") for k in metrics) and "majority_accuracy" in metrics


def _one_class(folder: Path) -> Path:
    """The sentiment data with only its positive rows: the majority rate is 1.0."""
    folder.mkdir()
    for src, dest in (("train.jsonl", "train.jsonl"), ("dev.jsonl", "validation.jsonl")):
        rows = [json.loads(line) for line in (SENTIMENT / src).read_text().splitlines()]
        (folder / dest).write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] == 1))
    return folder


@pytest.mark.parametrize(("lr", "steps", "learns"), [(1e-9, 2, False), (0.3, 8, True)])
def test_labels_all_one_class_meet_the_majority_rule(tiny_model, tmp_path: Path, lr, steps, learns) -> None:
    recipe = _seq_cls(tiny_model, tmp_path / "run", learning_rate=lr, max_steps=steps, eval_strategy="no",
                      save_strategy="no", load_best_model_at_end=False, warmup_ratio=0.0)  # fmt: skip
    recipe["data"]["path"] = str(_one_class(tmp_path / "positive"))
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    codes = [f["code"] for f in json.loads((tmp_path / "run" / "health.json").read_text())["findings"]]
    assert metrics["majority_accuracy"] == 1.0
    assert (metrics["eval_accuracy"] == 1.0) is learns  # the head learns "always positive" only with a real rate
    assert ("below_majority_class" in codes) is not learns


def test_an_evaluation_does_not_stop_a_4bit_model_from_learning(tiny_model, tmp_path: Path) -> None:
    """bitsandbytes repacks 4-bit CPU weights at the first no-grad forward in eval mode (the step-0 evaluation) into
    a layout without backward; a trained model keeps the plain one, so gradients still reach the vectors."""
    import torch

    from ia3cli.training import preflight
    from ia3cli.tuners import ia3

    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run", model={"quantization": "4bit"})
    recipe = validate_mapping(raw)
    model, _ = ia3.build(recipe, preflight.run(recipe).plan)
    ids = torch.tensor([[2, 10, 11, 12, 13]])

    def grads() -> list[float]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [0.0 if p.grad is None else p.grad.norm().item() for n, p in model.named_parameters() if "ia3_l" in n]

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert min(before) > 0 and grads() == pytest.approx(before)


def test_the_step_0_evaluation_does_not_change_what_is_trained(tiny_model, tmp_path: Path) -> None:
    """Iterating the evaluation DataLoader draws from the global torch RNG; dropout draws from it next."""
    from safetensors.torch import load_file

    adapters = []
    for flag in (True, False):
        recipe = _seq_cls(tiny_model, tmp_path / f"run-{flag}", eval_on_start=flag, save_strategy="no",
                          load_best_model_at_end=False)  # fmt: skip
        result = runner.invoke(app, ["train", str(write_recipe(tmp_path / f"{flag}.yaml", recipe))])
        assert result.exit_code == 0, result.output
        adapters.append(load_file(tmp_path / f"run-{flag}" / "adapter_model.safetensors"))
    on, off = adapters
    assert on.keys() == off.keys()
    assert max((on[k] - off[k]).abs().max().item() for k in on) == 0.0
    assert max((t - 1).abs().max().item() for k, t in on.items() if "ia3_l" in k) > 1e-4  # and they did train
