"""ia3cli's cache (float32 copies of GGUF bases): announced when written, listed and cleaned by ``ia3 cache``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.errors import Ia3Error
from ia3cli.models import cache

runner = CliRunner()


def _cached(root: Path, name: str, size: int) -> Path:
    """A folder as ``dequantized_gguf`` leaves it: weights plus the marker written before it is published."""
    folder = root / "gguf" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    cache.mark(folder, Path(f"/models/{name}.gguf"))
    return folder


def test_list_and_clean_touch_only_what_ia3cli_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IA3CLI_CACHE", str(tmp_path))
    a, b = _cached(tmp_path, "a-1234", 3000), _cached(tmp_path, "b-5678", 5000)
    foreign = tmp_path / "gguf" / "not-ours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")

    listed = runner.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0, listed.output
    assert "a-1234" in listed.output and "/models/b-5678.gguf" in listed.output and "not-ours" not in listed.output
    assert [e.name for e in cache.entries()] == ["a-1234", "b-5678"]

    one = runner.invoke(app, ["cache", "clean", "a-1234"])
    assert one.exit_code == 0 and "removed 1 cached folder" in one.output
    assert not a.exists() and b.exists()
    unknown = runner.invoke(app, ["cache", "clean", "not-ours"])
    assert unknown.exit_code == 2 and "not in the cache: not-ours" in unknown.output
    everything = runner.invoke(app, ["cache", "clean"])
    assert everything.exit_code == 0 and "removed 1 cached folder" in everything.output
    assert not b.exists() and (foreign / "keep.txt").read_text() == "mine\n"
    assert "the cache is empty" in runner.invoke(app, ["cache", "list"]).output


def test_a_written_folder_is_announced_with_its_size_and_the_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _cached(tmp_path, "c-0000", 2048)
    with caplog.at_level(logging.WARNING, logger="ia3cli"):
        cache.announce(folder, Path("/models/c.gguf"))
    assert str(folder) in caplog.text and "c.gguf" in caplog.text and "ia3 cache clean" in caplog.text
    assert "(2.1 KB)" in caplog.text  # the weights and the marker


def test_clean_of_an_unknown_name_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IA3CLI_CACHE", str(tmp_path))
    with pytest.raises(Ia3Error, match="not in the cache"):
        cache.clean(["x"])
