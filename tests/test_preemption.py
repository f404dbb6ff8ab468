"""Preemption: SIGTERM / SIGUSR1 -> the step finishes, a checkpoint is saved, exit 75; ``--resume`` continues exactly.

The run is a real ``python -m ia3cli train`` subprocess, slowed down by a ``sitecustomize`` that sleeps in each
training step and in each checkpoint save, so that the signals reliably land mid-run and mid-save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.cli.launch import preempted_status
from ia3cli.config.load import validate_mapping
from ia3cli.errors import RecipeError
from tests.conftest import ROOT, cli_env, tiny_recipe, write_recipe
from tests.test_distributed import _max_diff
from tests.test_resume import SLOW_STEPS, _checkpointed_recipe

SLOW_SAVES = """
_save = _trainer.Trainer._save_checkpoint


def _slow_save(self, *args, **kwargs):
    time.sleep(1.0)
    return _save(self, *args, **kwargs)


_trainer.Trainer._save_checkpoint = _slow_save
"""


def _start(recipe: Path, tmp_path: Path) -> subprocess.Popen:
    slow = tmp_path / "slow"
    slow.mkdir(exist_ok=True)
    (slow / "sitecustomize.py").write_text(SLOW_STEPS + SLOW_SAVES)
    return subprocess.Popen(
        [sys.executable, "-m", "ia3cli", "train", str(recipe)],
        cwd=ROOT, env=cli_env(slow), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait(found, proc: subprocess.Popen, what: str, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while not (value := found()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)
    return value


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_stops_with_75_and_resume_equals_an_uninterrupted_run(
    tiny_model, tmp_path: Path, sig: signal.Signals
) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "recipe.yaml", _checkpointed_recipe(model_dir, out))
    checkpoints = out / "checkpoints"
    proc = _start(recipe_path, tmp_path)
    _wait(lambda: (checkpoints / "checkpoint-2" / "trainer_state.json").is_file(), proc, "first checkpoint")
    proc.send_signal(sig)
    # the same signal again while the preemption checkpoint is being written: ignored, the save completes
    newer = _wait(
        lambda: [p for p in checkpoints.glob("checkpoint-*") if p.name != "checkpoint-2"],
        proc,
        "the preemption checkpoint",
    )
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]

    assert proc.returncode == 75, output
    step = int(newer[0].name.split("-")[1])
    assert 3 <= step < 12, step
    assert f"preempted: {sig.name} received: training stopped after step {step}" in output, output
    assert "--resume" in output and "Traceback" not in output
    state = json.loads((checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    info, health = (json.loads((out / name).read_text()) for name in ("run.json", "health.json"))
    assert info["status"] == health["status"] == "preempted"
    assert info["preempted"] == health["preempted"] == {
        "signal": sig.name, "step": step, "checkpoint": str(checkpoints / f"checkpoint-{step}")
    }  # fmt: skip
    assert not (out / "adapter_model.safetensors").exists()
    if sig != signal.SIGTERM:
        return  # the same stop: resuming is checked once

    resumed = CliRunner().invoke(app, ["train", str(recipe_path), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {checkpoints / f'checkpoint-{step}'}" in resumed.output
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert json.loads((out / "health.json").read_text())["status"] == "ok"

    straight = _checkpointed_recipe(model_dir, tmp_path / "straight")
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "straight.yaml", straight))])
    assert result.exit_code == 0, result.output
    assert _max_diff(out, tmp_path / "straight") <= 1e-6  # measured: 0.0


def test_the_launcher_names_a_preempted_run(tmp_path: Path) -> None:
    """torchrun reports any non-zero worker exit as 1; ``ia3 train --nproc`` reads run.json to say 75 instead."""
    (tmp_path / "run.json").write_text(json.dumps({"status": "preempted"}))
    assert preempted_status(1, str(tmp_path)) == 75
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    assert preempted_status(1, str(tmp_path)) == 1
    assert preempted_status(0, str(tmp_path)) == 0
    assert preempted_status(1, str(tmp_path / "missing")) == 1


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model": {"gguf_file": "model.gguf"}}, ["GGUF", "model.gguf_file", "ddp"]),
        ({"model": {"quantization": "8bit"}}, ["8-bit", "quantization: 4bit", "ddp"]),
        ({"adapter": {"method": "full"}}, ["'full'", "ddp"]),
        ({"model": {"task": "seq-cls"}}, ["model.task: seq-cls", "ddp"]),
        ({"adapter": {"modules_to_save": ["lm_head"]}}, ["adapter.modules_to_save"]),
    ],
    ids=["gguf", "8bit", "full", "seq-cls", "modules_to_save"],
)
def test_fsdp_refuses_what_it_cannot_shard(tmp_path: Path, change: dict, words: list[str]) -> None:
    raw = tiny_recipe(tmp_path, "causal-lm", tmp_path / "out", training={"distributed": "fsdp"})
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(RecipeError) as err:
        validate_mapping(raw)
    assert "training.distributed: 'fsdp'" in str(err.value)
    for word in words:
        assert word in str(err.value)
    raw["training"]["distributed"] = "ddp"
    validate_mapping(yaml.safe_load(yaml.safe_dump(raw)))  # the same recipe with ddp is fine


def test_fsdp_takes_a_4bit_base(tmp_path: Path) -> None:
    raw = tiny_recipe(tmp_path, "causal-lm", tmp_path / "out", training={"distributed": "fsdp"})
    raw["model"]["quantization"] = "4bit"
    assert validate_mapping(raw).model.quantization == "4bit"


def test_after_a_preemption_a_repeated_signal_cannot_kill_the_run_before_it_exits() -> None:
    """The watch puts the process's handlers back when the run ends, except after a preemption: the process is then
    on its way to exit 75, and the signal again (SLURM and Kubernetes may repeat it) must not kill it first."""
    from ia3cli.training.preemption import SIGNALS, PreemptionWatch

    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        quiet = PreemptionWatch()
        quiet.close()
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
        watch = PreemptionWatch()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == "SIGUSR1"
        watch.close()
        assert all(signal.getsignal(sig) == watch._handle for sig in SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)  # with SIGUSR1's default action this process would end here
        assert watch.received == "SIGUSR1"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
