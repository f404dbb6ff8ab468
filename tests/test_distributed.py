"""Several processes on the CPU: ``torchrun -m ia3cli train`` and ``ia3 train --nproc 2`` (gloo) match one process.

To compare adapters the data order must not matter: the training set is exactly one global batch (16 rows) and
``group_by_length`` is off, so every step of every run sees every row once, whatever the sampler. The Trainer's
``DistributedSampler`` shards a shuffled order between the ranks, the single process's ``RandomSampler`` shuffles
with the same seed; the rows meet in a different order only within the batch, where the mean loss ignores it. The
tiny Llama has no dropout, so the runs differ only by float rounding (measured: about 2e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.cli.launch import torchrun_command, without_nproc
from tests.conftest import ROOT, cli_env, tiny_recipe, write_recipe

ATOL = 1e-5  # measured: about 2e-7 (float rounding); the IA3 vectors move by about 1.5e-2


def _one_global_batch(model_dir: Path, task: str, out: Path, **training) -> dict:
    return tiny_recipe(
        model_dir, task, out,
        data={"train_samples": 16, "eval_split": None},
        training={"max_steps": 3, "group_by_length": False, **training},
    )  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=240, check=False
    )  # fmt: skip


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def _single_process(tmp_path: Path, recipe: dict) -> Path:
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "single.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return Path(recipe["training"]["output_dir"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama", "seq-cls")
    out = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "ddp.yaml", _one_global_batch(model_dir, "seq-cls", out, batch_size=8))
    run = _cli(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ia3cli", "train", str(recipe),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr

    # one writer, one printer
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("adapter_model.safetensors")] == [
        Path("ddp/adapter_model.safetensors")
    ]
    assert run.stdout.count("adapter saved to") == 1 and run.stdout.count("trainable params:") == 1
    assert "{'loss'" not in run.stdout and "\r" not in run.stdout, run.stdout  # plain lines, not a redrawn bar
    progress = [line for line in run.stdout.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"], run.stdout  # rank 0 only, a line per step
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]  # one writer
    assert (out / "report.png").is_file()
    assert not list(out.glob(".staging-*")) and not list(out.glob("*.tmp"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["per_device_batch_size"], metrics["global_batch_size"]) == (2, 8, 16)
    assert metrics["global_step"] == 3
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert json.loads((out / "health.json").read_text())["steps"] == 3

    single = _single_process(tmp_path, _one_global_batch(model_dir, "seq-cls", tmp_path / "single", batch_size=16))
    assert _max_diff(out, single) < ATOL


@pytest.mark.slow
def test_nproc_flag_hands_over_to_torchrun(tiny_model, tmp_path: Path) -> None:
    """``ia3 train --nproc 2`` on a causal LM equals one process accumulating two batches of 8."""
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "ddp.yaml", _one_global_batch(model_dir, "causal-lm", out, batch_size=8))
    run = _cli(sys.executable, "-m", "ia3cli", "train", str(recipe), "--nproc", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("adapter saved to") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["global_step"]) == (2, 16, 3)

    accumulated = _one_global_batch(
        model_dir, "causal-lm", tmp_path / "single", batch_size=8, gradient_accumulation_steps=2
    )
    assert _max_diff(out, _single_process(tmp_path, accumulated)) < ATOL


def test_gradient_accumulation_equals_one_big_batch_for_seq_cls(tiny_model, tmp_path: Path) -> None:
    """Sequence-classification losses are a mean per batch: the Trainer must still divide by the accumulation."""
    model_dir = tiny_model("llama", "seq-cls")
    big = _single_process(tmp_path, _one_global_batch(model_dir, "seq-cls", tmp_path / "big", batch_size=16))
    small = _one_global_batch(model_dir, "seq-cls", tmp_path / "acc", batch_size=8, gradient_accumulation_steps=2)
    acc = _single_process(tmp_path, small)
    assert _max_diff(big, acc) < ATOL
    assert json.loads((acc / "metrics.json").read_text())["global_batch_size"] == 16


@pytest.mark.parametrize(
    ("argv", "kept"),
    [
        (["train", "r.yaml", "--nproc", "2"], ["train", "r.yaml"]),
        (["train", "--nproc=4", "r.yaml", "--resume"], ["train", "r.yaml", "--resume"]),
        (["train", "r.yaml", "--set", "training.seed=1"], ["train", "r.yaml", "--set", "training.seed=1"]),
    ],
)
def test_relaunch_drops_nproc_and_uses_torchrun(argv: list[str], kept: list[str]) -> None:
    command = torchrun_command(2, argv)
    assert without_nproc(argv) == kept
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[-len(kept) - 2 :] == ["-m", "ia3cli", *kept]
    assert "--standalone" in command and command[command.index("--nproc_per_node") + 1] == "2"


@pytest.mark.slow
def test_torchrun_with_the_tfew_objective_matches_one_process(tiny_model, tmp_path: Path) -> None:
    """The T-Few terms are means per micro-batch; every row's correct choice and every wrong one has the same number
    of target tokens here (one word + EOS), so two ranks of 8 rows equal one process of 16 rows."""
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "ddp"
    recipe = _one_global_batch(model_dir, "causal-lm", out, batch_size=8, objective="tfew")
    run = _cli(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ia3cli", "train", str(write_recipe(tmp_path / "ddp.yaml", recipe)),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((out / "metrics.json").read_text())["global_batch_size"] == 16

    single = _one_global_batch(model_dir, "causal-lm", tmp_path / "single", batch_size=16, objective="tfew")
    assert _max_diff(out, _single_process(tmp_path, single)) < ATOL
    accumulated = _one_global_batch(
        model_dir, "causal-lm", tmp_path / "acc", batch_size=8, gradient_accumulation_steps=2, objective="tfew"
    )
    assert _max_diff(out, _single_process(tmp_path, accumulated)) < ATOL
