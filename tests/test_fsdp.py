"""``training.distributed: fsdp`` on the CPU (torchrun, gloo): the base is sharded, the results equal one process.

As in ``test_distributed.py``, the training set is exactly one global batch (``group_by_length`` off), so every step
of every run sees every row whatever the sampler, and the runs differ only by float rounding. The tiny T5 is saved
with ``dropout_rate: 0``: with dropout, one process and two draw different masks. Each torchrun start costs seconds
on two cores, so the multi-process cases are few and each checks several things.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from tests.conftest import ROOT, auto_model, cli_env, free_port, tiny_recipe, write_recipe
from tests.test_distributed import _cli, _max_diff, _single_process
from tests.test_resume import SLOW_STEPS

ATOL = 1e-5  # measured: 1.2e-7 (llama and T5); the IA3 vectors move by about 1.5e-2


def _recipe(model_dir: Path, task: str, out: Path, *, batch_size: int, **training) -> dict:
    return tiny_recipe(
        model_dir, task, out,
        data={"train_samples": 16, "eval_split": None},
        training={"max_steps": 3, "batch_size": batch_size, "group_by_length": False, **training},
        monitor={"every_steps": 1},
    )  # fmt: skip


def _no_dropout_t5(tiny_model, tmp_path: Path) -> Path:
    folder = shutil.copytree(tiny_model("t5", "seq2seq"), tmp_path / "t5-no-dropout")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    return folder


def _adapter_config(run: Path) -> dict:
    """adapter_config.json with its lists sorted (PEFT keeps target modules in a set: their order varies)."""
    config = json.loads((run / "adapter_config.json").read_text())
    return {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()}


def _logits(model_dir: Path, task: str, run: Path) -> torch.Tensor:
    """Logits of the base with the run's adapter, loaded by plain transformers + PEFT (no ia3cli code)."""
    from peft import PeftModel

    base = auto_model(task).from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    extra = {"decoder_input_ids": torch.tensor([[0, 10, 11]])} if task == "seq2seq" else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("t5", "seq2seq")])
def test_fsdp_on_two_ranks_equals_one_process(tiny_model, tmp_path: Path, kind: str, task: str) -> None:
    model_dir = tiny_model(kind, task) if kind == "llama" else _no_dropout_t5(tiny_model, tmp_path)
    out = tmp_path / "fsdp"
    recipe = write_recipe(tmp_path / "fsdp.yaml", _recipe(model_dir, task, out, batch_size=8, distributed="fsdp"))
    run = _cli(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ia3cli", "train", str(recipe),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("adapter saved to") == 1
    assert "memory per rank (fsdp over 2 ranks)" in run.stdout
    info = json.loads((out / "run.json").read_text())
    assert (info["world_size"], info["distributed"], info["status"]) == (2, "fsdp", "finished")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["global_step"]) == (2, 16, 3)

    single = _single_process(tmp_path, _recipe(model_dir, task, tmp_path / "single", batch_size=16))
    # the same adapter files as one process (hence as DDP) writes: same tensors, same config
    assert _max_diff(out, single) < ATOL
    assert _adapter_config(out) == _adapter_config(single)
    assert max((t - 1).abs().max().item() for t in load_file(out / "adapter_model.safetensors").values()) > 1e-3
    # plain PeftModel on the unsharded base: the same logits as the one-process adapter
    assert (_logits(model_dir, task, out) - _logits(model_dir, task, single)).abs().max().item() < 1e-4
    # the monitor's per-group norms are those of the full, averaged gradients: step by step as in one process
    ours, theirs = (
        [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
        for run_dir in (out, single)
    )
    norms = [(k, a[k], b[k]) for a, b in zip(ours, theirs, strict=True) for k in a if k.startswith("ia3/grad_norm_")]
    assert len(norms) == 9, norms  # 3 steps x k, v, ff
    assert all(abs(x - y) <= 1e-5 * max(abs(y), 1e-3) for _, x, y in norms), norms
    if kind == "llama":  # ia3 eval and ia3 merge take the run dir as they take any other
        evaluated = CliRunner().invoke(app, ["eval", str(out), "--split", "validation", "--json"])
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads(evaluated.output)["rows"] == 16
        merged = CliRunner().invoke(app, ["merge", str(out), str(tmp_path / "merged")])
        assert merged.exit_code == 0, merged.output
        report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
        assert report["max_abs_diff"] <= report["tolerance"]


def _logits_4bit(model_dir: Path, run: Path) -> torch.Tensor:
    """Logits of a 4-bit base (packed as bitsandbytes packs it by default) with the run's adapter, by plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[2, 10, 11, 12, 13, 14]])).logits


@pytest.mark.slow
def test_fsdp_4bit_base_under_accelerate_launch_equals_one_process(tiny_model, tmp_path: Path) -> None:
    """A 4-bit base (bfloat16 storage and compute), sharded after PEFT wraps it, on two ranks started by
    ``accelerate launch`` (gloo), two micro-batches per step: the vectors of one unsharded 4-bit process that takes
    the global batch at once."""
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "fsdp4"
    raw = _recipe(model_dir, "causal-lm", out, batch_size=4, gradient_accumulation_steps=2, distributed="fsdp")
    # the FSDP + QLoRA setting: bfloat16 weights, so the packed 4-bit values are stored as bfloat16 too
    raw["model"].update(quantization="4bit", dtype="bfloat16", bnb_4bit_compute_dtype="bfloat16")
    recipe = write_recipe(tmp_path / "fsdp4.yaml", raw)
    run = _cli(
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "ia3cli", "train", str(recipe),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # per block 7 Linear4bit weights and 2 norms, twice; the embeddings, the final norm and the head: all sharded
    assert "fsdp: 21 base tensors sharded over 2 rank(s), trained ones whole" in run.stdout, run.stdout
    assert "all params: 281,280" in run.stdout  # the 4-bit weights counted as weights, not as packed float32 cells
    assert json.loads((out / "run.json").read_text())["distributed"] == "fsdp"

    one = dict(raw, training={**raw["training"], "batch_size": 16, "gradient_accumulation_steps": 1,
                               "distributed": "ddp", "output_dir": str(tmp_path / "one")})  # fmt: skip
    single = _single_process(tmp_path, one)
    assert _max_diff(out, single) < ATOL  # measured: 1.2e-7
    assert max((t - 1).abs().max().item() for t in load_file(out / "adapter_model.safetensors").values()) > 1e-3
    assert (_logits_4bit(model_dir, out) - _logits_4bit(model_dir, single)).abs().max().item() < 1e-4
    evaluated = CliRunner().invoke(app, ["eval", str(out), "--split", "validation", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["rows"] == 16


@pytest.mark.slow
def test_fsdp_over_two_nodes_equals_one_process(tiny_model, tmp_path: Path) -> None:
    """Two torchrun agents, one process each, that meet through c10d rendezvous on loopback: the multi-node launch
    (``--nnodes 2 --node_rank N``) on one machine. The two nodes share ``output_dir``, as on a shared filesystem."""
    model_dir = tiny_model("llama", "causal-lm")
    out = tmp_path / "nodes"
    recipe = write_recipe(tmp_path / "nodes.yaml", _recipe(model_dir, "causal-lm", out, batch_size=8,
                                                           distributed="fsdp"))  # fmt: skip
    endpoint = f"127.0.0.1:{free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ia3"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*launch, "--node_rank", str(rank), "-m", "ia3cli", "train", str(recipe)],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sum(o.count("adapter saved to") for o in outputs) == 1, outputs
    assert any("fsdp: " in o and "sharded over 2 rank(s)" in o for o in outputs), outputs
    info = json.loads((out / "run.json").read_text())
    assert (info["world_size"], info["distributed"], info["status"]) == (2, "fsdp", "finished")
    single = _single_process(tmp_path, _recipe(model_dir, "causal-lm", tmp_path / "single", batch_size=16))
    assert _max_diff(out, single) < ATOL


def test_accelerate_use_fsdp_is_refused_before_loading(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """``accelerate launch --use_fsdp`` would wrap the model in Accelerate's FSDP1 (peft#1702): a short error."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_model("llama", "causal-lm"), "causal-lm", out,
                                                        batch_size=4, distributed="fsdp"))  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "training.distributed: is 'fsdp' and this process was started by accelerate launch --use_fsdp" in (
        result.output
    )
    assert "accelerate launch --multi_gpu --num_processes N" in result.output
    assert "Traceback" not in result.output and not out.exists()


def _start(recipe: Path, out: Path, slow: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ia3cli", "train", str(recipe), "--nproc", "2", *args],
        cwd=ROOT, env=cli_env(slow), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no {path} within {seconds} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fsdp_preempted_then_killed_then_resumed_equals_one_process(tiny_model, tmp_path: Path, quantization) -> None:
    """``ia3 train --nproc 2``: SIGTERM to it (as Kubernetes sends to PID 1) -> checkpoint, exit 75; ``--resume`` ->
    kill -9 of every process after the next checkpoint; ``--resume`` again -> the vectors of one uninterrupted
    process (with the same base: full precision, or 4-bit, sharded after it is wrapped)."""
    model_dir = tiny_model("llama", "causal-lm")
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    out = tmp_path / "run"
    fsdp = dict(batch_size=4, max_steps=12, save_strategy="steps", save_steps=4, distributed="fsdp")
    recipe = _recipe(model_dir, "causal-lm", out, **fsdp)
    recipe["data"]["train_samples"] = 8
    recipe["model"]["quantization"] = quantization
    path = write_recipe(tmp_path / "fsdp.yaml", recipe)
    checkpoints = out / "checkpoints"

    proc = _start(path, out, slow)
    _wait_for(checkpoints / "checkpoint-4" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 75, output
    assert "preempted: SIGTERM received: training stopped after step" in output, output
    info, health = (json.loads((out / name).read_text()) for name in ("run.json", "health.json"))
    step = info["preempted"]["step"]
    assert info["status"] == health["status"] == "preempted" and 4 <= step < 12
    assert (checkpoints / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert json.loads((checkpoints / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "adapter_model.safetensors").exists()

    proc = _start(path, out, slow, "--resume")
    _wait_for(checkpoints / f"checkpoint-{step + 4 - step % 4}" / "trainer_state.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.communicate(timeout=60)

    proc = _start(path, out, tmp_path / "not-slow", "--resume")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 12
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    single = dict(fsdp, batch_size=8, distributed="ddp")
    straight = _recipe(model_dir, "causal-lm", tmp_path / "single", **single)
    straight["data"]["train_samples"] = 8
    straight["model"]["quantization"] = quantization
    assert _max_diff(out, _single_process(tmp_path, straight)) < 1e-6
