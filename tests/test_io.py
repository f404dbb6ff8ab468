"""ia3cli replaces only what it wrote: --overwrite and --force refuse every other folder and delete nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.errors import Ia3Error
from ia3cli.outputs import RUN_MARKER, check_replaceable, write_atomic
from tests.conftest import tiny_recipe, write_recipe

runner = CliRunner()


def _user_folder(path: Path) -> dict[str, bytes]:
    """A folder of a user's own files; returns its contents, byte for byte."""
    (path / "precious").mkdir(parents=True)
    (path / "notes.md").write_text("# my notes\n")
    (path / "precious" / "thesis.txt").write_bytes(b"chapter 1\x00\xff")
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_train_overwrite_keeps_a_folder_ia3cli_did_not_write(tiny_model, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", mine))
    result = runner.invoke(app, ["train", str(recipe), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "did not write" in result.output and "nothing was deleted" in result.output
    assert "Traceback" not in result.output
    assert _snapshot(mine) == before


def test_train_resume_refuses_a_folder_that_is_not_a_run(tiny_model, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", mine))
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 2 and "not an ia3cli run dir" in result.output, result.output
    assert _snapshot(mine) == before


def test_train_refuses_resume_with_overwrite_and_keeps_the_checkpoints(tiny_model, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}\n")
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}\n')
    before = _snapshot(run)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", run))
    result = runner.invoke(app, ["train", str(recipe), "--resume", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "--resume and --overwrite together" in result.output and "Traceback" not in result.output
    assert _snapshot(run) == before


@pytest.mark.parametrize("where", ["working-dir", "home", "recipe-folder", "data-folder"])
def test_overwrite_refuses_protected_folders_even_when_they_look_like_runs(
    tiny_model, tmp_path: Path, monkeypatch, where: str
) -> None:
    home = tmp_path / "home"
    project = home / "project"
    data = project / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text(
        "".join(f'{{"text": "row {i} good", "label": {i % 2}}}\n' for i in range(16)), encoding="utf-8"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    target = {"working-dir": project, "home": home, "recipe-folder": project, "data-folder": data}[where]
    (target / RUN_MARKER).write_text("{}")  # even a folder that claims to be a run
    cwd = tmp_path / "elsewhere" if where == "recipe-folder" else project
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", target)
    recipe["data"] = {
        "path": str(data),
        "label_names": ["negative", "positive"],
        "eval_split": None,
        "prompt_template": "{text}",
    }
    path = write_recipe(project / "r.yaml", recipe)
    before = _snapshot(home)
    result = runner.invoke(app, ["train", str(path), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "refusing to replace" in result.output
    assert _snapshot(home) == before


@pytest.mark.parametrize("name", [".", "~"])
def test_check_replaceable_refuses_dot_and_home(tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / RUN_MARKER).write_text("{}")
    with pytest.raises(Ia3Error, match="refusing to replace"):
        check_replaceable(Path(name), RUN_MARKER, key="training.output_dir", flag="--overwrite")


def test_check_replaceable_accepts_missing_empty_and_marked_folders(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "missing", RUN_MARKER, key="k", flag="--f")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", RUN_MARKER, key="k", flag="--f")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_MARKER).write_text("{}")
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"x")
    check_replaceable(tmp_path / "run", RUN_MARKER, key="k", flag="--f")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / RUN_MARKER).write_text("{}")
    with pytest.raises(Ia3Error, match="git repository"):
        check_replaceable(tmp_path / "repo", RUN_MARKER, key="k", flag="--f")


def test_merge_force_keeps_a_folder_ia3cli_did_not_write(tiny_model, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", run))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    mine = tmp_path / "mine"
    before = _user_folder(mine)
    result = runner.invoke(app, ["merge", str(run), str(mine), "--force"])
    assert result.exit_code == 2 and "did not write" in result.output, result.output
    assert _snapshot(mine) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]  # no temporary left behind


def test_write_atomic_keeps_the_file_mode_of_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
