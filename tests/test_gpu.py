"""CUDA paths: 4-bit NF4 training with bfloat16 compute, eval and merge; FSDP over several GPUs. Skipped on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ia3cli.cli.app import app
from tests.conftest import tiny_recipe, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
runner = CliRunner()


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("bert", "seq-cls")])
def test_4bit_bf16_training_on_cuda_then_eval_and_merge(tiny_model, tmp_path: Path, kind: str, task: str) -> None:
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model(kind, task),
        task,
        out,
        model={"quantization": "4bit", "bnb_4bit_compute_dtype": "bfloat16"},
        training={"max_steps": 6},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "health.json").read_text())["status"] in ("ok", "warning")
    assert json.loads((out / "run.json").read_text())["quantization"] == "4bit"

    quantised = runner.invoke(app, ["eval", str(out), "--json"])
    assert quantised.exit_code == 0, quantised.output
    full = runner.invoke(app, ["eval", str(out), "--full-precision", "--json"])
    assert full.exit_code == 0, full.output
    a, b = json.loads(quantised.output), json.loads(full.output)
    assert a["rows"] == b["rows"] == 16

    merged = runner.invoke(app, ["merge", str(out), str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["trained_quantization"] == "4bit"
    assert report["max_abs_diff"] <= report["tolerance"]


def test_4bit_training_with_the_tfew_objective(tiny_model, tmp_path: Path) -> None:
    """The T-Few loss is computed from the logits of a 4-bit base like any other; rank classification follows."""
    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model("llama", "causal-lm"),
        "causal-lm",
        out,
        model={"quantization": "4bit", "bnb_4bit_compute_dtype": "bfloat16"},
        training={"max_steps": 6, "objective": "tfew", "optimizer": "adafactor"},
    )
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert json.loads((out / "health.json").read_text())["status"] in ("ok", "warning")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP shards across ranks: needs two GPUs")
def test_fsdp_over_every_gpu_equals_one_gpu(tiny_model, tmp_path: Path) -> None:
    """``training.distributed: fsdp`` on NCCL with a bfloat16 base: one global batch split over the GPUs gives the
    vectors of one GPU (bfloat16 weights, float32 vectors: a looser tolerance than the CPU test's)."""
    import sys

    from tests.test_distributed import _cli, _max_diff

    gpus = torch.cuda.device_count()
    model_dir = tiny_model("llama", "causal-lm")

    def recipe(out: Path, batch_size: int, distributed: str) -> dict:
        return tiny_recipe(
            model_dir, "causal-lm", out,
            model={"dtype": "bfloat16"},
            data={"train_samples": 8 * gpus, "eval_split": None},
            training={"max_steps": 3, "batch_size": batch_size, "group_by_length": False, "distributed": distributed},
        )  # fmt: skip

    out = tmp_path / "fsdp"
    path = write_recipe(tmp_path / "fsdp.yaml", recipe(out, 8, "fsdp"))
    run = _cli(sys.executable, "-m", "ia3cli", "train", str(path), "--nproc", str(gpus))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"memory per rank (fsdp over {gpus} ranks)" in run.stdout
    one = runner.invoke(
        app, ["train", str(write_recipe(tmp_path / "one.yaml", recipe(tmp_path / "one", 8 * gpus, "ddp")))]
    )
    assert one.exit_code == 0, one.output
    assert _max_diff(out, tmp_path / "one") < 1e-3
