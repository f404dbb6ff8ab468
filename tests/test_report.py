"""``ia3 report``: the data behind each panel of a tiny run, the HTML page, old runs, and what it may overwrite."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.report import build as report
from tests.conftest import tiny_recipe, write_recipe

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(tmp: Path, recipe: dict) -> Path:
    result = runner.invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return Path(recipe["training"]["output_dir"])


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT run: 8 steps, a log line per step, an evaluation per epoch, custom monitor thresholds."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = tiny_recipe(
        tiny_model("bert", "seq-cls"),
        "seq-cls",
        tmp / "run",
        training={"max_steps": None, "epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch"},
        monitor={"every_steps": 2, "vanishing_below": 2e-7, "exploding_above": 5.0},
    )
    return _train(tmp, recipe)


def _vectors(run: Path) -> dict[str, np.ndarray]:
    return {
        k.split(".ia3_l")[0].removeprefix("base_model.model."): t.float().numpy()
        for k, t in load_file(run / "adapter_model.safetensors").items()
        if "ia3_l" in k
    }


def test_train_writes_the_report_and_the_model_card_shows_it(run: Path) -> None:
    png = (run / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and b"ia3cli" in png[:4096]
    assert "](report.png)" in (run / "README.md").read_text()


def test_curves_have_a_point_per_logged_step_and_per_evaluation(run: Path) -> None:
    data = report.build(run)
    curves = data["curves"]
    assert curves["train_loss"]["step"] == list(range(1, 9))
    assert len(curves["learning_rate"]["value"]) == 8
    # the step-0 evaluation (the untouched model) is the first point of every evaluation curve
    assert curves["eval"]["accuracy"]["step"] == [0, 4, 8] and curves["eval"]["loss"]["step"] == [0, 4, 8]
    metrics = json.loads((run / "metrics.json").read_text())
    assert data["baseline"] == metrics["baseline_accuracy"] == curves["eval"]["accuracy"]["value"][0]
    assert data["majority"] == metrics["majority_accuracy"]
    assert set(curves["grad_norm"]) == set(curves["drift"]) == {"k", "v", "ff"}
    assert all(len(s["value"]) == 8 for s in curves["grad_norm"].values())
    assert data["thresholds"] == {"vanishing_below": 2e-7, "exploding_above": 5.0}
    assert data["metric"] == "accuracy" and data["steps"] == 8 and data["missing"] == []
    # the logged values, not a resampling of them
    log = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert curves["grad_norm"]["k"]["value"][2] == next(r["ia3/grad_norm_k"] for r in log if r["step"] == 3)


def test_vector_panels_account_for_every_entry(run: Path) -> None:
    data = report.build(run)
    vectors = _vectors(run)
    suffix = {"attention.self.key": "k", "attention.self.value": "v", "output.dense": "ff"}  # BERT's IA3 targets
    groups = {m: next(g for end, g in suffix.items() if m.endswith(end)) for m in vectors}
    assert len(groups) == 6
    assert data["groups"] == ["k", "v", "ff"]
    for g in data["groups"]:
        flat = np.concatenate([v.reshape(-1) for m, v in vectors.items() if groups[m] == g])
        h = data["histograms"][g]
        assert sum(h["counts"]) == h["entries"] == flat.size
        assert h["amplified"] == int((flat > 1).sum()) and h["inhibited"] == int((flat < 1).sum())
        assert h["amplified"] + h["inhibited"] + h["unchanged"] == flat.size
        top = data["top"][g]
        up, down = [d["value"] for d in top["amplified"]], [d["value"] for d in top["inhibited"]]
        assert up == sorted(up, reverse=True) and all(v > 1 for v in up) and up[0] == pytest.approx(flat.max())
        assert down == sorted(down) and all(v < 1 for v in down) and down[0] == pytest.approx(flat.min())
        best = top["amplified"][0]
        assert vectors[best["module"]].reshape(-1)[best["index"]] == pytest.approx(best["value"])

    heat = data["heatmap"]
    assert heat["layers"] == ["0", "1"] and heat["groups"] == ["k", "v", "ff"]
    assert np.array(heat["values"]).shape == (2, 3)
    key = vectors["bert.encoder.layer.1.attention.self.key"]
    assert heat["values"][1][0] == pytest.approx(float(np.abs(key - 1).mean()))


def test_html_is_one_self_contained_file(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(?!data:)', page), "no external resources"
    assert "bert.encoder.layer" in page and "most amplified" in page
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary file left


def test_old_run_without_train_log_still_renders_and_says_what_is_missing(run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("logs", "report.*"))
    data = report.build(old)  # the newest checkpoint's trainer_state.json stands in for the log
    assert data["log_source"] == "checkpoints/checkpoint-8/trainer_state.json"
    assert data["curves"]["train_loss"]["step"] == list(range(1, 9))
    assert any("checkpoint-8" in m for m in data["missing"])

    shutil.rmtree(old / "checkpoints")
    data = report.build(old)
    assert data["log_source"] is None and data["curves"]["train_loss"]["step"] == []
    assert data["missing"] and "train_log.jsonl" in data["missing"][0]
    assert data["histograms"]["k"]["entries"] > 0  # the vectors are still drawn
    result = runner.invoke(app, ["report", str(old), "--format", "html"])
    assert result.exit_code == 0, result.output
    assert "Not shown" in (old / "report.html").read_text() and "train_log.jsonl" in (old / "report.html").read_text()
    assert (report.write(old)).read_bytes().startswith(PNG_MAGIC)


def test_unfinished_run_renders_its_curves_without_vectors(run: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("adapter_model.safetensors", "report.*"))
    data = report.build(cut)
    assert data["groups"] == [] and "adapter_model.safetensors" in data["missing"][0]
    assert len(data["curves"]["train_loss"]["step"]) == 8
    assert report.write(cut).is_file()


def test_refuses_to_overwrite_a_file_it_did_not_write(run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "photo.png"
    mine.write_bytes(PNG_MAGIC + b"holiday")
    result = runner.invoke(app, ["report", str(run), "--out", str(mine)])
    assert result.exit_code == 2 and "not an ia3cli report" in result.output
    assert mine.read_bytes() == PNG_MAGIC + b"holiday"
    again = tmp_path / "again.png"
    for _ in range(2):  # its own report is replaced
        assert runner.invoke(app, ["report", str(run), "--out", str(again)]).exit_code == 0
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a run dir" in bad.output
    assert runner.invoke(app, ["report", str(run), "--format", "svg"]).exit_code == 2


def test_four_bit_causal_run_has_the_same_panels(tiny_model, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "q4", model={"quantization": "4bit"})
    data = report.build(_train(tmp_path, recipe))
    assert data["quantization"] == "4bit" and data["groups"] == ["k", "v", "ff"]
    assert data["heatmap"]["layers"] == ["0", "1"] and len(data["curves"]["grad_norm"]["ff"]["step"]) == 4


@pytest.mark.parametrize(
    ("module", "feedforward", "group"),
    [
        ("model.layers.0.self_attn.k_proj", ["down_proj"], "k"),
        ("model.layers.0.self_attn.v_proj", ["down_proj"], "v"),
        ("model.layers.0.mlp.down_proj", ["down_proj"], "ff"),
        ("model.layers.0.mlp.down_proj", None, "ff"),
        ("bert.encoder.layer.3.output.dense", r".*\.\d+\.output\.dense", "ff"),
        ("bert.encoder.layer.3.attention.output.dense", r".*\.\d+\.output\.dense", "other"),
        ("bert.encoder.layer.3.output.dense", None, "ff"),
        ("bert.encoder.layer.3.attention.self.key", None, "k"),
        ("encoder.block.0.layer.0.SelfAttention.k", ["wo"], "k"),
        ("decoder.block.1.layer.2.DenseReluDense.wo", ["wo"], "ff"),
        ("transformer.h.0.attn.c_attn", None, "qkv"),
        ("transformer.h.0.mlp.c_proj", None, "ff"),
        ("transformer.h.0.attn.c_proj", None, "other"),
        ("distilbert.transformer.layer.0.ffn.lin2", None, "ff"),
    ],
)
def test_vector_groups_by_module_name(module: str, feedforward, group: str) -> None:
    assert report.vector_group(module, feedforward) == group


def test_layers_of_encoder_decoder_models_are_told_apart() -> None:
    assert report.layer_of("encoder.block.2.layer.0.SelfAttention.k") == (0, 2)
    assert report.layer_of("decoder.block.2.layer.0.SelfAttention.k") == (1, 2)
    assert report.layer_of("lm_head") is None
