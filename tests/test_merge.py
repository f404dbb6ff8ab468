"""`ia3 merge` on real tiny models: the merged checkpoint reproduces the adapter, for every family and for 4-bit runs.

Run dirs are built directly by `tests.conftest.make_run` (random non-identity IA3 vectors, perturbed heads); one test
goes through `ia3cli.training.run.run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import load_recipe, validate_mapping
from ia3cli.errors import Ia3Error, RunError
from ia3cli.inference.merge import merge
from ia3cli.tuners import ia3
from tests.conftest import auto_model, make_run, tiny_recipe


def probe_inputs(run_dir: Path) -> dict[str, torch.Tensor]:
    """Inputs independent of merge's own probe: three dev sentences of different lengths, padded."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(run_dir))
    texts = ["A warm, clever comedy.", "The app bombards you with ads and upsells, sadly.", "Pretty good"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if recipe.model.task == "seq2seq":
        batch["labels"] = tokenizer(text_target=["positive", "negative", "positive"], return_tensors="pt")["input_ids"]
    return batch


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


FAMILIES = [
    pytest.param("bert", "seq-cls", "none", id="bert-seq-cls"),
    pytest.param("llama", "causal-lm", "none", id="llama-causal-lm"),
    pytest.param("t5", "seq2seq", "none", id="t5-seq2seq"),
    pytest.param("gpt2", "causal-lm", "none", id="gpt2-conv1d"),
    pytest.param("llama", "causal-lm", "4bit", id="llama-trained-4bit"),
]


@pytest.mark.parametrize(("kind", "task", "quantization"), FAMILIES)
def test_merged_model_matches_adapter(tmp_path: Path, tiny_model, kind: str, task: str, quantization: str) -> None:
    run_dir = make_run(tmp_path, tiny_model(kind, task), task, quantization=quantization)
    out = tmp_path / "merged"

    report = merge(run_dir, out)

    assert report["max_abs_diff"] <= 1e-4 and report["float32_max_abs_diff"] <= 1e-4
    assert report["probe_rows"] == 8 and report["probe_source"].endswith("[validation]")
    assert report["probe_warning"] is None
    assert report["trained_quantization"] == quantization
    assert json.loads((out / "merge_report.json").read_text())["max_abs_diff"] == report["max_abs_diff"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "recipe.yaml"):
        assert (out / name).is_file(), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".merged.*")), "temporary dirs left behind"

    # Independently of merge's probe: plain transformers load vs the full-precision adapter model.
    recipe = load_recipe(run_dir / "recipe.yaml")
    full = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})
    adapter, _ = ia3.load_run_model(run_dir, full)
    adapter.eval()
    merged = auto_model(task).from_pretrained(str(out)).eval()
    batch = probe_inputs(run_dir)
    expected, got = logits_of(adapter, batch), logits_of(merged, batch)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    with adapter.disable_adapter():  # the adapter must matter, or this test proves nothing
        assert (logits_of(adapter, batch) - expected).abs().max() > 1e-3
    print(f"{kind}/{task}/{quantization}: max_abs_diff {report['max_abs_diff']:.2e}")


def test_seq_cls_head_is_the_trained_copy(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls")
    merge(run_dir, tmp_path / "merged")
    recipe = load_recipe(run_dir / "recipe.yaml")
    adapter, _ = ia3.load_run_model(run_dir, recipe)
    trained = adapter.base_model.model.classifier.modules_to_save["default"].weight
    original = adapter.base_model.model.classifier.original_module.weight
    merged = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert torch.equal(merged.classifier.weight, trained) and not torch.equal(trained, original)
    assert merged.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.parametrize(("dtype", "rtol"), [("bfloat16", 5e-2), ("float16", 1e-2)])
def test_half_precision_output_is_checked_with_a_looser_tolerance(
    tmp_path: Path, tiny_model, dtype: str, rtol: float
) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    report = merge(run_dir, tmp_path / "merged", dtype=dtype)
    assert report["dtype"] == dtype and report["float32_max_abs_diff"] <= 1e-4  # the merge itself: exact
    assert report["tolerance"] == pytest.approx(rtol * max(1.0, report["max_abs_logit"]))
    assert 0 < report["max_abs_diff"] <= report["tolerance"]  # the cast: rounding, bounded
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.dtype == getattr(torch, dtype)
    print(f"llama {dtype}: max_abs_diff {report['max_abs_diff']:.2e} (tolerance {report['tolerance']:.2e})")


def test_probe_falls_back_to_random_tokens_when_data_is_gone_and_says_why(tmp_path: Path, tiny_model) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "great", "label": 1}\n{"text": "bad", "label": 0}\n')
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", data={"path": str(data)})
    data.unlink()
    result = CliRunner().invoke(app, ["merge", str(run_dir), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["probe_source"] == "random tokens" and report["probe_rows"] == 4
    assert report["max_abs_diff"] <= 1e-4
    why = f"{data}: file or folder not found"
    assert report["probe_warning"] == (
        f"the run's data could not be used ({why}; {why}): the outputs were compared on random tokens"
    )
    assert f"warning: {report['probe_warning']}" in result.output.splitlines()
    assert "on 4 rows of random tokens" in result.output
    assert f"Warning: {report['probe_warning']}." in (tmp_path / "merged" / "README.md").read_text()


def test_probe_skips_a_split_with_a_bad_row(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "great", "label": 1}\n{"text": "bad", "label": 0}\n')
    (folder / "validation.jsonl").write_text('{"text": "great", "label": 1}\n{"text": "bad", "label": 7}\n')
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", data={"path": str(folder)})
    report = merge(run_dir, tmp_path / "merged")
    assert (report["probe_source"], report["probe_rows"], report["probe_warning"]) == (f"{folder} [train]", 2, None)


def test_a_bug_while_building_the_probe_is_not_hidden(tmp_path: Path, tiny_model, monkeypatch) -> None:
    from ia3cli.data import encoding as data

    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in encode_row")

    monkeypatch.setattr(data, "encode_row", broken)
    with pytest.raises(RuntimeError, match="a bug in encode_row"):
        merge(run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_merge_that_changes_the_outputs_fails_and_writes_nothing(tmp_path: Path, tiny_model, monkeypatch) -> None:
    from peft.tuners.ia3 import IA3Model

    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    monkeypatch.setattr(IA3Model, "merge_and_unload", lambda self, *a, **k: self.unload())  # drops the vectors
    with pytest.raises(RunError, match="merge check failed") as err:
        merge(run_dir, tmp_path / "merged")
    assert err.value.exit_code == 1
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def test_non_empty_out_is_refused_without_force_and_an_earlier_merge_is_replaced_with_it(
    tmp_path: Path, tiny_model
) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    out = tmp_path / "merged"
    merge(run_dir, out)
    (out / "stale.bin").write_text("from the earlier merge")
    with pytest.raises(Ia3Error, match="not empty") as err:
        merge(run_dir, out)
    assert err.value.exit_code == 2 and "--force" in str(err.value)
    assert (out / "stale.bin").is_file()

    merge(run_dir, out, force=True)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_force_never_replaces_a_folder_ia3cli_did_not_write(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    out = tmp_path / "mine"
    (out / "precious").mkdir(parents=True)
    (out / "notes.md").write_text("# notes\n")
    (out / "precious" / "thesis.txt").write_bytes(b"chapter 1\x00\xff")
    with pytest.raises(Ia3Error, match="did not write") as err:
        merge(run_dir, out, force=True)
    assert err.value.exit_code == 2 and "nothing was deleted" in str(err.value)
    assert (out / "notes.md").read_text() == "# notes\n"
    assert (out / "precious" / "thesis.txt").read_bytes() == b"chapter 1\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # no temporary left behind


def test_empty_out_dir_is_used(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    (tmp_path / "merged").mkdir()
    merge(run_dir, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-out", "force-over-old-out"])
def test_interrupted_merge_leaves_out_untouched(tmp_path: Path, tiny_model, monkeypatch, existing: bool) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    out = tmp_path / "merged"
    if existing:
        merge(run_dir, out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_written(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", half_written)
    with pytest.raises(OSError, match="No space"):
        merge(run_dir, out, force=True)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run"] + (["merged"] if existing else []))


def test_bad_run_dirs_are_named(tmp_path: Path, tiny_model) -> None:
    with pytest.raises(Ia3Error, match="run directory not found") as err:
        merge(tmp_path / "nope", tmp_path / "out")
    assert str(tmp_path / "nope") in str(err.value) and err.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(Ia3Error, match="no adapter_config.json"):
        merge(tmp_path / "empty", tmp_path / "out")
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    with pytest.raises(Ia3Error, match="outside the run dir"):
        merge(run_dir, run_dir, force=True)
    with pytest.raises(Ia3Error, match="outside the run dir"):
        merge(run_dir, tmp_path, force=True)
    with pytest.raises(Ia3Error, match="--dtype"):
        merge(run_dir, tmp_path / "out", dtype="int8")
    (run_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(Ia3Error, match="no adapter_model.safetensors"):
        merge(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("gpt2", "causal-lm"), "causal-lm")
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(run_dir), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["load", "merge", "check", "save", "verify"]
    assert lines[-1] == (
        f"merged into {tmp_path / 'merged'} (max |delta logits| {report['max_abs_diff']:.2e} on 8 rows of "
        f"{report['probe_source']})"
    )
    assert report["probe_source"].endswith("sentiment [validation]")

    again = runner.invoke(app, ["merge", str(run_dir), str(tmp_path / "merged")])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output

    missing = runner.invoke(app, ["merge", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert missing.exit_code == 2, missing.output
    assert "error:" in missing.output and "run directory not found" in missing.output
    assert "Traceback" not in missing.output and len(missing.output.splitlines()) <= 3


def test_run_trained_by_ia3_train_merges(tmp_path: Path, tiny_model) -> None:
    from ia3cli.training.run import run

    model_dir = tiny_model("bert", "seq-cls")
    recipe = validate_mapping(tiny_recipe(model_dir, "seq-cls", tmp_path / "run"))
    run(recipe, printer=lambda _line: None)
    report = merge(tmp_path / "run", tmp_path / "merged")
    assert report["max_abs_diff"] <= 1e-4 and report["probe_rows"] == 8

    from ia3cli.scoring.eval_command import run_eval

    args = {"recipe_path": None, "data": None, "split": None, "overrides": [], "full_precision": False}
    on_run, on_merged = run_eval(str(tmp_path / "run"), **args), run_eval(str(tmp_path / "merged"), **args)
    assert on_run["accuracy"] == on_merged["accuracy"] and on_run["loss"] == pytest.approx(on_merged["loss"], abs=1e-5)
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())  # the Trainer's final evaluation
    assert on_run["accuracy"] == trained["eval_accuracy"] and on_run["loss"] == pytest.approx(trained["eval_loss"])
