"""Crash safety: ``kill -9`` then ``--resume`` equals an uninterrupted run; partial files are never used or shown.

The killed run is a real ``python -m ia3cli train`` subprocess, slowed down by a ``sitecustomize`` that sleeps in
each training step, so that the kill reliably lands after the first checkpoint and well before the end.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import dump_recipe, validate_mapping
from ia3cli.outputs import write_atomic
from ia3cli.training.rundir import latest_checkpoint
from tests.conftest import ROOT, cli_env, tiny_recipe, write_recipe

runner = CliRunner()

SLOW_STEPS = """\
import time

import transformers.trainer as _trainer

_step = _trainer.Trainer.training_step


def _slow_step(self, *args, **kwargs):
    time.sleep(0.3)
    return _step(self, *args, **kwargs)


_trainer.Trainer.training_step = _slow_step
"""


def _checkpointed_recipe(model_dir: Path, out: Path) -> dict:
    return tiny_recipe(
        model_dir, "causal-lm", out,
        data={"eval_split": None},
        training={"max_steps": 12, "batch_size": 4, "save_strategy": "steps", "save_steps": 2},
    )  # fmt: skip


def _train(tmp_path: Path, recipe: dict, *args: str, name: str = "recipe.yaml"):
    return runner.invoke(app, ["train", str(write_recipe(tmp_path / name, recipe)), *args])


def _kill_after_first_checkpoint(recipe_path: Path, out: Path, tmp_path: Path) -> int:
    """Start ``ia3 train`` in a subprocess, ``kill -9`` it once a checkpoint is complete; return that step."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ia3cli", "train", str(recipe_path)],
        cwd=ROOT, env=cli_env(slow), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = latest_checkpoint(out / "checkpoints")
    assert done is not None
    return int(done.name.split("-")[-1])


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "run"
    recipe = _checkpointed_recipe(model_dir, out)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)
    step = _kill_after_first_checkpoint(recipe_path, out, tmp_path)
    assert 2 <= step < 12

    # nothing half-written is visible: the final files appear only by rename, at the very end
    assert yaml.safe_load((out / "recipe.yaml").read_text()) and json.loads((out / "run.json").read_text())
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "health.json"):
        assert not (out / name).exists(), name

    # a checkpoint killed mid-write: newer, adapter truncated, no trainer_state.json (the Trainer writes it last)
    partial = out / "checkpoints" / "checkpoint-10"
    partial.mkdir(exist_ok=True)
    real = (out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(real[: len(real) // 2])
    (partial / "trainer_state.json").unlink(missing_ok=True)
    # and a final save killed before its renames: a staging folder with a half-written adapter
    (out / ".staging-killed").mkdir()
    (out / ".staging-killed" / "adapter_model.safetensors").write_bytes(real[:10])

    resumed = runner.invoke(app, ["train", str(recipe_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'}" in resumed.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 12
    assert not list(out.glob(".staging-*")) and not list(out.glob(".*.tmp"))

    straight = _checkpointed_recipe(model_dir, tmp_path / "straight")
    result = _train(tmp_path, straight, name="straight.yaml")
    assert result.exit_code == 0, result.output
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-6, diff  # measured: 0.0 (RNG, optimizer and scheduler state come back from the checkpoint)
    assert max((t - 1).abs().max().item() for k, t in a.items() if "ia3_l" in k) > 1e-3


# --- which checkpoint counts as complete ----------------------------------------------------------------------


def _checkpoint(root: Path, step: int, *, state: str | None = "{}", adapter: str = "ok") -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    if state is not None:
        (ckpt / "trainer_state.json").write_text(state)
    if adapter != "missing":
        save_file({"ia3_l": torch.ones(8)}, str(ckpt / "adapter_model.safetensors"))
        if adapter == "truncated":
            data = (ckpt / "adapter_model.safetensors").read_bytes()
            (ckpt / "adapter_model.safetensors").write_bytes(data[: len(data) - 7])
    return ckpt


@pytest.mark.parametrize(
    ("newer", "why"),
    [
        ({"state": None}, "killed before trainer_state.json (written last)"),
        ({"state": '{"global_step": 1'}, "trainer_state.json cut short"),
        ({"adapter": "truncated"}, "adapter cut short"),
        ({"adapter": "missing"}, "adapter missing"),
    ],
)
def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path, newer: dict, why: str) -> None:
    good = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, **newer)
    (tmp_path / "checkpoint-last").mkdir()
    assert latest_checkpoint(tmp_path) == good, why


def test_latest_checkpoint_orders_by_step_number(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 9)
    newest = _checkpoint(tmp_path, 10)
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    write_atomic(target, '{"old": true}\n')

    def disk_full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_atomic(target, '{"new": true}\n')
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --- refusals and environment errors: one line, no traceback --------------------------------------------------


def _assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for w in words:
        assert w in result.output, result.output


def test_resume_refuses_a_run_of_another_recipe(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out)
    out.mkdir()
    (out / "recipe.yaml").write_text(dump_recipe(validate_mapping(recipe)))
    (out / "run.json").write_text("{}")
    recipe["training"]["learning_rate"] = 5e-3
    _assert_one_line_error(_train(tmp_path, recipe, "--resume"), 2, "different recipe", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml", "run.json"]


def test_resume_without_a_run_is_refused(tiny_model, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run")
    _assert_one_line_error(_train(tmp_path, recipe, "--resume"), 2, "no run to resume")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("under-a-file", ["cannot create", "Not a directory"]),  # tests run as root: chmod would not stop a write
        ("/proc/ia3cli-test/run", ["cannot create"]),
    ],
)
def test_an_unwritable_output_dir_is_one_line(tiny_model, tmp_path: Path, where: str, words: list[str]) -> None:
    if where == "under-a-file":
        (tmp_path / "plain-file").write_text("x")
        where = str(tmp_path / "plain-file" / "run")
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", Path(where))
    _assert_one_line_error(_train(tmp_path, recipe), 1, *words)


def test_disk_full_is_one_line(tiny_model, tmp_path: Path, monkeypatch) -> None:
    import ia3cli.training.run

    def disk_full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ia3cli.training.run, "write_atomic", disk_full)
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run")
    _assert_one_line_error(_train(tmp_path, recipe), 1, "No space left on device", "free disk space")


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run_with_tfew_and_templates(tiny_model, tmp_path: Path) -> None:
    """The T-Few objective over choice batches and per-epoch template draws resume exactly too: 16 rows at batch 4
    are 4 steps an epoch, so the resumed part crosses epochs whose templates are drawn again."""
    model_dir = tiny_model("llama", "causal-lm")

    def recipe_for(out: Path) -> dict:
        recipe = _checkpointed_recipe(model_dir, out)
        recipe["data"].update(
            train_samples=16, prompt_templates=["Review: {text}\nSentiment:", "{text}\nthe sentiment is :"]
        )
        recipe["training"].update(objective="tfew", optimizer="adafactor")
        return recipe

    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe_for(out))
    step = _kill_after_first_checkpoint(recipe_path, out, tmp_path)
    assert 2 <= step < 12
    resumed = runner.invoke(app, ["train", str(recipe_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 12

    result = _train(tmp_path, recipe_for(tmp_path / "straight"), name="straight.yaml")
    assert result.exit_code == 0, result.output
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((t - 1).abs().max().item() for t in a.values()) > 1e-3
