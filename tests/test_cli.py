"""The command line itself: instant help, examples, exit codes, error rendering, generated README reference."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "train",
    "validate",
    "inspect-modules",
    "eval",
    "merge",
    "export",
    "predict",
    "report",
    "runs",
    "compare",
    "serve",
]
runner = CliRunner()


def test_help_and_schema_errors_import_no_heavy_library(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: m, taks: x}\ndata: {path: d}\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ia3cli.cli.app import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        f"assert r.invoke(app, ['validate', {str(bad)!r}]).exit_code == 2\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_ends_with_real_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0
    assert "Examples:" in result.output
    examples = result.output.split("Examples:")[1]
    assert f"ia3 {command}" in examples


def test_console_script_and_module_entry_points_work() -> None:
    exe = Path(sys.executable).parent / "ia3"
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "ia3cli", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "inspect-modules" in out.stdout


def test_recipe_errors_are_short_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: m}\ndata: {path: d}\ntraining: {learnig_rate: 1}\n")
    out = subprocess.run([sys.executable, "-m", "ia3cli", "train", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "training.learnig_rate: unknown key (did you mean 'learning_rate'?)" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3


def test_validate_reports_targets_and_data(tiny_model, tmp_path: Path) -> None:
    from tests.conftest import tiny_recipe, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "o"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert "targets ['k_proj', 'v_proj', 'down_proj']  feed-forward ['down_proj']" in lines
    # 2 layers x (k: 2 kv heads x 16 dims = 32, v: 32, down_proj input: 128)
    assert f"IA3 parameters {2 * (32 + 32 + 128):,}" in lines
    assert "data    train: 32 rows, validation: 16 rows" in lines  # train_samples 32, eval_samples 16
    assert not (tmp_path / "o").exists(), "validate must not write anything"


def test_inspect_modules_json_from_config_alone(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    ).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    result = runner.invoke(app, ["inspect-modules", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model_type"] == "llama"
    assert info["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    assert info["feedforward_modules"] == ["down_proj"]
    # k and v: 2 kv heads x 16 dims = 32 each; down_proj input 128; 2 layers
    assert info["ia3_params"] == 2 * (32 + 32 + 128)
    assert info["lora_r8_params"] > info["ia3_params"]


def test_inspect_modules_human_output_and_bad_task(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    result = runner.invoke(app, ["inspect-modules", str(tmp_path), "--task", "seq-cls"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line.startswith("bert.")}
    scaled = {pattern: cells[-1] for pattern, cells in rows.items() if cells[-1] in ("out", "ff:in")}
    assert scaled == {
        "bert.encoder.layer.*.attention.self.key": "out",
        "bert.encoder.layer.*.attention.self.value": "out",
        "bert.encoder.layer.*.output.dense": "ff:in",
    }
    assert rows["bert.encoder.layer.*.attention.self.query"][0] == "2"  # listed (2 layers), not scaled
    assert re.search(r"^IA3 parameters:\s+512 in 6 modules$", result.output, re.MULTILINE)  # 2 x (64 + 64 + 128)
    bad = runner.invoke(app, ["inspect-modules", str(tmp_path), "--task", "classify"])
    assert bad.exit_code == 2 and "seq-cls, causal-lm or seq2seq" in bad.output


def test_inspect_modules_unknown_model_is_a_short_error() -> None:
    result = runner.invoke(app, ["inspect-modules", "/no/such/model"])
    assert result.exit_code == 2
    assert "model.name" in result.output and result.exception is not None
    assert "Traceback" not in result.output


def test_readme_reference_is_generated_from_the_code() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ia3cli.cli.docs", "--check", str(ROOT / "README.md")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_readme_documents_every_recipe_key() -> None:
    from ia3cli.config.recipe import SECTIONS

    readme = (ROOT / "README.md").read_text()
    for name, section in SECTIONS.items():
        for key in section.model_fields:
            assert f"| `{key}` |" in readme, f"{name}.{key} missing from README"
