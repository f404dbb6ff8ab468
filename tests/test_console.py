"""The console of ia3 commands: plain progress lines off a terminal, train/eval/merge output, --version, ia3 runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.report.console import Console, fmt
from tests.conftest import tiny_recipe, write_recipe

runner = CliRunner()


# ---- the Console itself ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "every", "printed"),
    [
        (20, None, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),  # a tenth of the total
        (7, None, [1, 2, 3, 4, 5, 6, 7]),
        (10, 4, [4, 8, 10]),  # the last count is always printed once, when the bar closes
        (None, 5, [5, 10, 12]),  # unknown total
    ],
)
def test_plain_progress_prints_every_n_steps_without_carriage_returns(total, every, printed) -> None:
    lines: list[str] = []
    console = Console(sink=lines.append)
    assert console.tty is False
    with console.progress(total, "train", every=every) as bar:
        for _ in range(total or 12):
            bar.advance(1, loss=0.5, health="ok")
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == printed
    assert all("\r" not in line and line.startswith("train ") for line in lines)
    assert lines[-1].split()[1] == (f"{total}/{total}" if total else "12")
    assert "loss 0.5000  health ok" in lines[-1]


def test_deferred_step_prints_once_with_the_fields_given_later() -> None:
    lines: list[str] = []
    bar = Console(sink=lines.append).progress(2, "train", every=1)
    bar.goto(1, defer=True, epoch="0.50")
    assert lines == []
    bar.update(loss=0.25)
    bar.refresh()
    bar.refresh()
    bar.close()
    assert len(lines) == 1 and "epoch 0.50  loss 0.2500" in lines[0]


def test_lines_events_and_stages_in_one_layout() -> None:
    lines: list[str] = []
    console = Console(sink=lines.append)
    console.line(Console.event("eval", "4/8", {"accuracy": 0.5, "f1": None}, "<- best accuracy"))
    with console.stages() as progress:
        for stage, total in (("loss", 4), ("rank", 8)):
            for _ in range(total):
                progress(stage, 1, total)
    assert lines[0] == "eval   4/8  accuracy 0.5000  <- best accuracy"
    assert [line.split()[:2] for line in lines[1:] if line.endswith("100%")] == [["loss", "4/4"], ["rank", "8/8"]]
    Console(enabled=False, sink=lines.append).line("rank 1 says")
    assert "rank 1 says" not in lines


@pytest.mark.parametrize(
    ("value", "text"), [(0.5, "0.5000"), (2e-5, "2.0e-05"), (0.0, "0.0000"), (123456.0, "1.2e+05"), (3, "3")]
)
def test_number_format(value, text: str) -> None:
    assert fmt(value) == text


# ---- ia3 train / eval / merge through the CLI (CliRunner is not a terminal) ----------------------------------------


def _recipe(tiny_model, out: Path, **training) -> dict:
    return tiny_recipe(
        tiny_model("bert", "seq-cls"),
        "seq-cls",
        out,
        training={"max_steps": None, "epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch", **training},
    )


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """One finished run (8 steps, an evaluation per epoch) and its console output."""
    tmp = tmp_path_factory.mktemp("console")
    out = tmp / "runs" / "done"
    result = runner.invoke(app, ["train", str(write_recipe(tmp / "r.yaml", _recipe(tiny_model, out)))])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_console_is_plain_and_readable(trained) -> None:
    out, output = trained
    assert "\r" not in output and "{'loss'" not in output and "'eval_loss'" not in output
    lines = output.splitlines()
    progress = [line for line in lines if line.startswith("train ")]
    assert progress[-1].startswith("train  8/8  100%") and "loss " in progress[-1] and "health " in progress[-1]
    evals = [line for line in lines if line.startswith("eval ")]
    assert [line.split()[1] for line in evals] == ["0/8", "4/8", "8/8"]  # the baseline, then one per epoch
    assert "majority " in evals[0] and evals[0].endswith("<- baseline before training")
    assert "accuracy " in evals[1] and evals[1].endswith("<- best accuracy")  # the first trained is the best so far
    assert [line.split()[1] for line in lines if line.startswith("health ")] == ["2/8", "4/8", "6/8", "8/8"]
    # the summary block is unchanged
    assert any(line.startswith("final: eval_loss") for line in lines)
    assert any(line.startswith("baseline: accuracy ") for line in lines)
    assert f"adapter saved to {out}" in output and f"next: ia3 eval {out}" in output


def test_train_log_has_one_line_per_logged_step_with_the_monitor_values(trained) -> None:
    out, _ = trained
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # logging_steps 1
    for r in steps:
        assert {"epoch", "learning_rate", "grad_norm", "ia3/grad_norm_k", "ia3/drift_ff", "ia3/at_init_v"} <= r.keys()
    evals = [r for r in records if "eval_accuracy" in r]
    expected = [(0, False), (4, False), (8, False), (8, True)]
    assert [(r["step"], r.get("after_training", False)) for r in evals] == expected
    assert any("train_runtime" in r for r in records)


@pytest.mark.parametrize("flag", ["--verbose", "--debug"])
def test_verbose_and_debug_bring_back_the_trainer_log_lines(tiny_model, tmp_path: Path, flag: str) -> None:
    recipe = tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", tmp_path / "run", training={"max_steps": 2})
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), flag])
    assert result.exit_code == 0, result.output
    assert result.output.count("{'loss'") == 2 and "train  2/2" in result.output


def test_eval_shows_progress_unless_json(trained) -> None:
    out, _ = trained
    table = runner.invoke(app, ["eval", str(out)])
    assert table.exit_code == 0, table.output
    assert "classify 16/16  100%" in table.output and "\r" not in table.output
    as_json = runner.invoke(app, ["eval", str(out), "--json"])
    assert json.loads(as_json.output)["rows"] == 16


def test_merge_prints_a_line_per_stage(trained, tmp_path: Path) -> None:
    out, _ = trained
    result = runner.invoke(app, ["merge", str(out), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    tags = [line.split()[0] for line in result.output.splitlines()]
    assert tags == ["load", "merge", "check", "save", "verify", "merged"]


# ---- ia3 --version, ia3 runs --------------------------------------------------------------------------------------


def test_version_lists_the_libraries_and_the_device() -> None:
    import peft
    import torch
    import transformers

    from ia3cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:4] == [
        f"ia3cli {__version__}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"peft {peft.__version__}",
    ]
    assert lines[4].startswith("bitsandbytes ")
    assert lines[5] == (
        "device cpu" if not torch.cuda.is_available() else f"device cuda ({torch.cuda.get_device_name(0)})"
    )


def test_runs_lists_finished_and_unfinished_runs(trained) -> None:
    out, _ = trained
    root = out.parent
    killed = root / "killed"  # started, then killed after a checkpoint: run.json but no adapter or metrics
    (killed / "checkpoints" / "checkpoint-3").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "run.json", killed / "run.json")
    shutil.copy(out / "recipe.yaml", killed / "recipe.yaml")
    (root / "notes").mkdir(exist_ok=True)  # not a run dir: not listed

    result = runner.invoke(app, ["runs", str(root), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == {"done", "killed"}
    done, cut = rows["done"], rows["killed"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (done["finished"], done["steps"], done["metric"], done["value"]) == (
        True,
        8,
        "accuracy",
        metrics["eval_accuracy"],
    )
    assert done["task"] == "seq-cls" and done["health"] in ("ok", "warning")
    assert (cut["finished"], cut["steps"], cut["value"], cut["health"]) == (False, 3, None, None)

    table = runner.invoke(app, ["runs", str(root)])
    lines = table.output.splitlines()
    assert lines[0].split() == ["name", "task", "base", "metric", "health", "steps", "date", "finished"]
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_name["done"][-1] == "yes" and by_name["killed"][-1] == "no"
    assert runner.invoke(app, ["runs", str(root / "nope")]).exit_code == 2
