"""`ia3 predict` on real tiny models: per-task outputs checked against PEFT, mixed files, order, bad rows, safety.

Run dirs are built by ``tests.test_mixed.make_adapter`` (random IA3 vectors and heads per adapter). References are
computed independently: ``PeftModel.from_pretrained`` with one adapter on one row at a time, and for choices
``ia3cli.scoring.evaluation.score_choices`` (the rank classification ``ia3 eval`` reports).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import load_recipe
from ia3cli.errors import DataError, Ia3Error
from ia3cli.inference.jobs import softmax
from ia3cli.inference.predict import predict, sidecar
from ia3cli.scoring.evaluation import score_choices
from ia3cli.tuners import ia3
from tests.test_mixed import make_adapter

TEXTS = ["a warm clever comedy", "ads and upsells sadly", "pretty good", "not worth the money at all", "great"]
LABELS = ["negative", "positive"]
GENERATE = {"label_names": None, "target_column": "label"}  # a causal-lm recipe without verbalisers: generation


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet(_line: str) -> None:
    pass


def peft_model(run_dir: Path):
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    return model.eval(), tokenizer, recipe


def test_seq_cls_rows_get_the_label_and_probabilities_of_their_adapter(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("bert", "seq-cls")
    runs = {n: make_adapter(tmp_path / "runs", model_dir, "seq-cls", n, s) for n, s in (("a", 1), ("b", 2))}
    names = ["a", "b", "b", "a", "b"]
    rows = [{"id": i, "text": t, "adapter": n} for i, (t, n) in enumerate(zip(TEXTS, names, strict=True))]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)

    result = predict(tmp_path / "runs", src, batch_size=2, printer=quiet)

    out = read_jsonl(tmp_path / "rows.predictions.jsonl")
    assert result.output == tmp_path / "rows.predictions.jsonl" and result.predicted == 5 and not result.errors
    assert [r["id"] for r in out] == list(range(5))  # input order, input columns kept
    assert all(r["text"] == t and r["adapter"] == n for r, t, n in zip(out, TEXTS, names, strict=True))
    for name in ("a", "b"):
        model, tokenizer, _ = peft_model(runs[name])
        for row in (r for r in out if r["adapter"] == name):
            with torch.no_grad():
                probs = model(**tokenizer(row["text"], return_tensors="pt")).logits.softmax(-1)[0].tolist()
            assert list(row["probabilities"]) == ["negative", "positive"]
            assert row["probabilities"] == pytest.approx(
                dict(zip(["negative", "positive"], probs, strict=True)), abs=1e-5
            )
            assert row["prediction"] == ["negative", "positive"][probs.index(max(probs))]


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("t5", "seq2seq")])
def test_choices_are_ranked_as_ia3_eval_ranks_them(tmp_path: Path, tiny_model, kind: str, task: str) -> None:
    run = make_adapter(tmp_path, tiny_model(kind, task), task, "run", 3)
    rows = [{"text": t} for t in TEXTS[:3]] + [{"text": TEXTS[3], "choices": ["yes", "no", "the answer"]}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)

    predict(run, src, tmp_path / "out.jsonl", batch_size=3, printer=quiet)

    out = read_jsonl(tmp_path / "out.jsonl")
    model, tokenizer, recipe = peft_model(run)
    for row in out:
        r = recipe.model_copy(deep=True)
        r.data.label_names = row.get("choices") or ["negative", "positive"]
        with torch.inference_mode():
            expected = softmax(score_choices(model, tokenizer, r, [row])[0])
        assert list(row["probabilities"]) == r.data.label_names
        assert list(row["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert row["prediction"] == r.data.label_names[expected.index(max(expected))]
    assert sum(out[3]["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("t5", "seq2seq")])
def test_generation_follows_the_prompt_template_greedily(tmp_path: Path, tiny_model, kind: str, task: str) -> None:
    run = make_adapter(tmp_path, tiny_model(kind, task), task, "run", 4, data=GENERATE)
    rows = [{"text": t} for t in TEXTS]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)

    predict(run, src, tmp_path / "out.jsonl", batch_size=2, max_new_tokens=6, printer=quiet)

    out = read_jsonl(tmp_path / "out.jsonl")
    model, tokenizer, recipe = peft_model(run)
    for row in out:
        prompt = recipe.data.prompt_template.format(**row)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = gen[0, ids["input_ids"].shape[1] :] if task == "causal-lm" else gen[0]
        assert row["prediction"] == tokenizer.decode(new, skip_special_tokens=True).strip(), row["text"]
    assert any(r["prediction"] for r in out)


def test_sampling_is_seeded(tmp_path: Path, tiny_model) -> None:
    run = make_adapter(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", "run", 4, data=GENERATE)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS])
    runs = []
    for n, seed in enumerate((7, 7, 8)):
        predict(run, src, tmp_path / f"s{n}.jsonl", temperature=1.5, top_p=0.95, seed=seed, printer=quiet)
        runs.append([r["prediction"] for r in read_jsonl(tmp_path / f"s{n}.jsonl")])
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize(("kind", "task"), [("bert", "seq-cls"), ("llama", "causal-lm")])
def test_a_mixed_file_predicts_as_each_adapter_alone(tmp_path: Path, tiny_model, kind: str, task: str) -> None:
    model_dir = tiny_model(kind, task)
    for n, s in (("a", 5), ("b", 6), ("c", 7)):
        make_adapter(tmp_path / "runs", model_dir, task, n, s)
    names = ["c", "a", "b", "a", "c", "b", "b", "a"]
    rows = [{"text": TEXTS[i % 5] + " " * (i // 5), "adapter": n} for i, n in enumerate(names)]
    mixed = read_jsonl(predict(tmp_path / "runs", write_jsonl(tmp_path / "all.jsonl", rows), printer=quiet).output)
    for name in "abc":
        own = [r for r in rows if r["adapter"] == name]
        alone = predict(tmp_path / "runs" / name, write_jsonl(tmp_path / f"{name}.jsonl", own), printer=quiet)
        expected = read_jsonl(alone.output)
        got = [r for r in mixed if r["adapter"] == name]
        assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]
        for g, e in zip(got, expected, strict=True):
            assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    assert len({json.dumps(r["probabilities"]) for r in mixed}) > 3  # the adapters matter


def test_bad_rows_fail_by_line_and_nothing_is_written(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("bert", "seq-cls")
    for n, s in (("a", 1), ("b", 2)):
        make_adapter(tmp_path / "runs", model_dir, "seq-cls", n, s)
    src = tmp_path / "rows.jsonl"
    src.write_text(
        '{"text": "good", "adapter": "a"}\n'
        '{"text": "bad", "adapter": "zz"}\n'
        "\n"
        '{"text": "no adapter"}\n'
        '{"txt": "typo", "adapter": "b"}\n'
        "{not json\n"
        '["a list"]\n'
        '{"text": "again", "adapter": "b", "prediction": "x"}\n'
        '{"text": "fine", "adapter": "b"}\n'
    )
    with pytest.raises(DataError, match="6 bad row") as err:
        predict(tmp_path / "runs", src, printer=quiet)
    message = str(err.value)
    for expected in (
        "line 2: unknown adapter 'zz' (loaded: a, b)",
        "line 4: no 'adapter' column and 2 adapters are loaded",
        "line 5: missing column 'text'",
        "line 6: not valid JSON",
        "line 7: a JSON list, not an object",
        "line 8: already has a 'prediction' column",
    ):
        assert expected in message
    assert "--on-error skip" in str(err.value) and err.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "runs"]

    lines: list[str] = []
    result = predict(tmp_path / "runs", src, on_error="skip", printer=lines.append)
    out = read_jsonl(result.output)
    assert [r["text"] for r in out] == ["good", "fine"] and result.predicted == 2 and result.rows == 8
    assert [e["where"] for e in result.errors] == ["line 2", "line 4", "line 5", "line 6", "line 7", "line 8"]
    assert any(line.startswith("skipped") and "line 5" in line for line in lines)
    meta = json.loads(sidecar(result.output).read_text())
    assert meta["skipped"] == 6 and meta["errors"][0] == {
        "where": "line 2",
        "error": "unknown adapter 'zz' (loaded: a, b)",
    }


def test_csv_and_parquet_inputs_and_a_single_adapter_default(tmp_path: Path, tiny_model) -> None:
    run = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "only", 1)
    with (tmp_path / "rows.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "note"])
        writer.writerows([["good", "x"], ["multi\nline", "y"], ["bad"], ["fine", "z"]])
    result = predict(run, tmp_path / "rows.csv", on_error="skip", printer=quiet)
    assert [e["where"] for e in result.errors] == ["line 5"]  # the quoted newline makes row 3 end on line 4
    assert [r["text"] for r in read_jsonl(result.output)] == ["good", "multi\nline", "fine"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS, "n": list(range(5))}), tmp_path / "rows.parquet")
    out = read_jsonl(predict(run, tmp_path / "rows.parquet", printer=quiet).output)
    assert [r["n"] for r in out] == list(range(5)) and all(r["prediction"] in LABELS for r in out)

    (tmp_path / "rows.json").write_text(json.dumps([{"text": "good"}, "oops", {"text": "bad"}]))
    result = predict(run, tmp_path / "rows.json", on_error="skip", printer=quiet)
    assert result.errors == [{"where": "row 2", "error": "a JSON str, not an object"}]
    assert [r["text"] for r in read_jsonl(result.output)] == ["good", "bad"]


def test_a_file_of_only_bad_rows_skipped_writes_an_empty_output(tmp_path: Path, tiny_model) -> None:
    run = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "run", 1)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"txt": "a"}, {"txt": "b"}])
    lines: list[str] = []
    result = predict(run, src, on_error="skip", printer=lines.append)
    assert result.predicted == 0 and len(result.errors) == 2 and result.output.read_text() == ""
    assert not any(line.startswith("predict:") for line in lines)  # no model was loaded


def test_output_replaces_only_an_earlier_predict_output(tmp_path: Path, tiny_model) -> None:
    run = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "run", 1)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": t} for t in TEXTS[:2]])
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my precious notes\n")
    with pytest.raises(Ia3Error, match="not an ia3 predict output") as err:
        predict(run, src, mine, printer=quiet)
    assert mine.read_text() == "my precious notes\n" and not sidecar(mine).exists()
    assert err.value.exit_code == 2
    with pytest.raises(Ia3Error, match="is the input file"):
        predict(run, src, src, printer=quiet)
    with pytest.raises(Ia3Error, match="JSON lines"):
        predict(run, src, tmp_path / "out.csv", printer=quiet)
    sidecar(tmp_path / "x.jsonl").write_text('{"mine": true}')
    with pytest.raises(Ia3Error, match="was not written by ia3 predict"):
        predict(run, src, tmp_path / "x.jsonl", printer=quiet)

    out = tmp_path / "out.jsonl"
    predict(run, src, out, printer=quiet)
    first = out.read_text()
    write_jsonl(src, [{"text": t} for t in TEXTS])
    predict(run, src, out, printer=quiet)  # an earlier predict output is replaced
    assert len(read_jsonl(out)) == 5 and out.read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_adapters_by_name_and_refused_combinations(tmp_path: Path, tiny_model) -> None:
    bert = tiny_model("bert", "seq-cls")
    a, b = (make_adapter(tmp_path, bert, "seq-cls", n, s) for n, s in (("a", 1), ("b", 2)))
    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": "good", "adapter": "x"}, {"text": "bad", "adapter": "a"}])
    out = read_jsonl(predict(a, src, adapters=[f"x={b}"], printer=quiet).output)
    assert [r["adapter"] for r in out] == ["x", "a"]
    with pytest.raises(Ia3Error, match="expected NAME=RUN_DIR"):
        predict(a, src, adapters=["nope"], printer=quiet)
    with pytest.raises(Ia3Error, match="'a' is already taken"):
        predict(a, src, adapters=[f"a={b}"], printer=quiet)
    with pytest.raises(Ia3Error, match="neither a run dir nor a folder of run dirs"):
        predict(bert, src, printer=quiet)  # a model folder, no adapter
    llama = make_adapter(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", "llama", 3)
    with pytest.raises(Ia3Error, match="adapter 'x' was trained on base model"):
        predict(a, src, tmp_path / "o2.jsonl", adapters=[f"x={llama}"], printer=quiet)


def test_cli_exit_codes(tmp_path: Path, tiny_model) -> None:
    run = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "run", 1)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TEXTS[:2]])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"txt": "typo"}])
    runner = CliRunner()

    ok = runner.invoke(app, ["predict", str(run), "--input", str(good), "-o", str(tmp_path / "p.jsonl")])
    assert ok.exit_code == 0, ok.output
    assert f"2 predictions written to {tmp_path / 'p.jsonl'}" in ok.stdout and "predicted 2/2 rows" in ok.stderr

    failed = runner.invoke(app, ["predict", str(run), "--input", str(bad)])
    assert failed.exit_code == 2 and "line 2: missing column 'text'" in failed.stderr
    assert "Traceback" not in failed.output and not (tmp_path / "bad.predictions.jsonl").exists()

    skipped = runner.invoke(app, ["predict", str(run), "--input", str(bad), "--on-error", "skip"])
    assert skipped.exit_code == 0 and "skipped 1 bad rows" in skipped.stdout and "line 2" in skipped.stderr

    for args in (
        ["predict", str(tmp_path / "nope"), "--input", str(good)],
        ["predict", str(run), "--input", str(tmp_path / "nope.jsonl")],
        ["predict", str(run), "--input", str(good), "-o", str(good)],
        ["predict", str(run), "--input", str(good), "--on-error", "ignore"],
        ["predict", str(run), "--input", str(good), "--top-p", "0"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.startswith("error:"), (args, result.output)


def test_chat_rows_generate_through_the_chat_template(tmp_path: Path, tiny_model) -> None:
    chat = {"messages_column": "messages", "label_names": None}
    run = make_adapter(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", "chat", 5, data=chat)
    rows = [{"messages": [{"role": "user", "content": t}]} for t in TEXTS[:3]]
    out = read_jsonl(predict(run, write_jsonl(tmp_path / "rows.jsonl", rows), max_new_tokens=5, printer=quiet).output)

    model, tokenizer, _ = peft_model(run)
    for row in out:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert (
            row["prediction"] == tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )


@pytest.mark.parametrize(
    ("value", "valid"),
    [(["yes", "no"], True), ('["yes", "no"]', True), (["yes", " "], False), (["yes"], False), ("yes", False)],
)
def test_predict_takes_the_choices_training_takes(tmp_path: Path, value, valid: bool) -> None:
    """One rule for a row's choices (``data.encoding.as_choices``): training's row check and ``ia3 predict`` agree;
    a CSV cell may hold the list as JSON."""
    from ia3cli.config.load import validate_mapping
    from ia3cli.data.encoding import as_choices
    from ia3cli.inference.rows import make_job
    from tests.conftest import tiny_recipe

    recipe = validate_mapping(tiny_recipe(tmp_path, "causal-lm", tmp_path / "out"))
    row = {"text": "is it?", "choices": value}
    if valid:
        assert make_job(0, row, "a", recipe).choices == ["yes", "no"]
        assert as_choices(json.loads(value) if isinstance(value, str) else value) == ["yes", "no"]
    else:
        with pytest.raises(ValueError, match="column 'choices' must be a list of at least two non-blank strings"):
            make_job(0, row, "a", recipe)
        assert as_choices(value) is None
