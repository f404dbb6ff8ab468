"""Data: token ids and loss masks spelled out by hand, row checks, split loading errors, prompt templates.

The expected ids come from the word-level tokenizers of ``tests/conftest.py`` (one id per lower-cased word or
punctuation mark): ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``[CLS]`` 4, ``[SEP]`` 5, ``.`` 10, ``:`` 11,
``assistant`` 84, ``bad`` 95, ``great`` 621, ``negative`` 917, ``positive`` 1063, ``review`` 1155,
``sentiment`` 1221, ``user`` 1514. The first test pins them, so a changed vocabulary fails there, not in a mask test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ia3cli.config.load import validate_mapping
from ia3cli.config.recipe import DataSection, Recipe
from ia3cli.data import checks
from ia3cli.data import encoding as data
from ia3cli.data import sources as loading
from ia3cli.errors import DataError, RecipeError
from tests.conftest import make_tokenizer

M = -100  # a masked label
IDS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "[CLS]": 4, "[SEP]": 5, ".": 10, ":": 11, "assistant": 84}
IDS |= {"bad": 95, "great": 621, "negative": 917, "positive": 1063, "review": 1155, "sentiment": 1221, "user": 1514}
LABELS = ["negative", "positive"]
PROMPT = "Review: {text}\nSentiment:"
CHAT = [
    {"role": "user", "content": "great."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "bad."},
    {"role": "assistant", "content": "negative"},
]
# Like Qwen3's template: an assistant turn that is not the last one loses its <think>...</think> part.
THINK_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : "
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] | trim }}"
    "{% else %}{{ m['content'] }}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
# The generation prompt ends inside the word the assistant turn continues: "assistant" + "positive" is one word.
GLUED_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }}{% if m['role'] != 'assistant' %} : {% endif %}{{ m['content'] }}"
    " </s> {% endfor %}{% if add_generation_prompt %}<s> assistant{% endif %}"
)


def recipe(task: str = "causal-lm", **data_keys: object) -> Recipe:
    """A recipe over ``data_keys`` with no evaluation (the model is never loaded)."""
    d = {"path": "unused", "eval_split": None, **data_keys}
    if task != "seq-cls" and "messages_column" not in d and "target_column" not in d:
        d.setdefault("label_names", LABELS)
    return validate_mapping({"model": {"name": "unused", "task": task}, "data": d, "training": {"eval_strategy": "no"}})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_ids_these_tests_spell_out() -> None:
    tok = make_tokenizer("llama")
    assert {w: tok.convert_tokens_to_ids(w) for w in IDS} == IDS


# --- token ids and masks, literally -------------------------------------------------------------------------------


def test_causal_lm_masks_the_prompt_and_learns_target_plus_eos() -> None:
    tok = make_tokenizer("llama")
    enc = data.encode_row({"text": "great.", "label": 1}, recipe(prompt_template=PROMPT), tok)
    #        <s>  review  :  great  .  sentiment  :  positive </s>
    assert enc["input_ids"] == [2, 1155, 11, 621, 10, 1221, 11, 1063, 3]
    assert enc["labels"] == [M, M, M, M, M, M, M, 1063, 3]
    assert enc["attention_mask"] == [1] * 9


def test_causal_lm_target_column_and_text_column() -> None:
    tok = make_tokenizer("llama")
    enc = data.encode_row({"text": "great.", "y": "bad."}, recipe(target_column="y"), tok)
    #        <s>  great  .  bad  .  </s>
    assert enc["input_ids"] == [2, 621, 10, 95, 10, 3]
    assert enc["labels"] == [M, M, M, 95, 10, 3]


def test_causal_lm_too_long_cuts_the_prompt_from_the_left() -> None:
    tok = make_tokenizer("llama")
    enc = data.encode_causal(tok, "Review: great.\nSentiment:", "positive", max_length=4)
    assert enc["input_ids"] == [1221, 11, 1063, 3]
    assert enc["labels"] == [M, M, 1063, 3]
    only_target = data.encode_causal(tok, "Review: great.", "positive negative", max_length=2)
    assert only_target == {"input_ids": [1063, 917], "attention_mask": [1, 1], "labels": [1063, 917]}


def test_chat_learns_both_assistant_turns_only() -> None:
    tok = make_tokenizer("llama")
    enc = data.encode_row({"messages": CHAT}, recipe(messages_column="messages"), tok)
    # <s> user : great . </s> <s> assistant : | positive </s> | <s> user : bad . </s> <s> assistant : | negative </s>
    assert enc["input_ids"] == [2, 1514, 11, 621, 10, 3, 2, 84, 11, 1063, 3, 2, 1514, 11, 95, 10, 3, 2, 84, 11, 917, 3]
    assert enc["labels"] == [M, M, M, M, M, M, M, M, M, 1063, 3, M, M, M, M, M, M, M, M, M, 917, 3]
    truncated = data.encode_chat(tok, CHAT, max_length=10)
    assert truncated["input_ids"] == [2, 1514, 11, 621, 10, 3, 2, 84, 11, 1063]
    assert truncated["labels"] == [M, M, M, M, M, M, M, M, M, 1063]


def test_seq2seq_encodes_input_and_target_separately() -> None:
    tok = make_tokenizer("t5")
    enc = data.encode_row({"text": "great.", "label": 0}, recipe("seq2seq", prompt_template=PROMPT), tok)
    #        review  :  great  .  sentiment  :  </s>
    assert enc["input_ids"] == [1155, 11, 621, 10, 1221, 11, 3]
    assert enc["labels"] == [917, 3]
    assert enc["attention_mask"] == [1] * 7


def test_seq_cls_text_pair_and_label_name() -> None:
    tok = make_tokenizer("bert")
    r = recipe("seq-cls", text_pair_column="pair", label_names=LABELS)
    enc = data.encode_row({"text": "great.", "pair": "bad.", "label": "positive"}, r, tok)
    #        [CLS] great  .  [SEP] bad  .  [SEP]
    assert enc["input_ids"] == [4, 621, 10, 5, 95, 10, 5]
    assert enc["labels"] == 1


# --- chat templates that rewrite earlier turns --------------------------------------------------------------------


def test_template_rewriting_earlier_turns_is_refused_naming_file_and_row(tmp_path: Path) -> None:
    reasoned = [
        {"role": "user", "content": "great."},
        {"role": "assistant", "content": "<think> great </think> positive"},
        {"role": "user", "content": "bad."},
        {"role": "assistant", "content": "negative"},
    ]
    file = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": reasoned}])
    tok = make_tokenizer("llama")
    tok.chat_template = THINK_TEMPLATE
    with pytest.raises(DataError) as err:
        data.build(recipe(path=str(file), messages_column="messages"), tok)
    assert (err.value.file, err.value.row) == (f"{file} [train]", 2)
    assert "rewrites earlier turns once message 3 follows them" in str(err.value)


def test_template_rewriting_only_reasoning_accepts_rows_without_it() -> None:
    tok = make_tokenizer("llama")
    tok.chat_template = THINK_TEMPLATE
    enc = data.encode_chat(tok, CHAT, max_length=64)
    assert enc["labels"] == [M, M, M, M, M, M, M, M, M, 1063, 3, M, M, M, M, M, M, M, M, M, 917, 3]
    last = [*CHAT[:3], {"role": "assistant", "content": "<think> bad </think> negative"}]
    enc = data.encode_chat(tok, last, max_length=64)  # reasoning in the last turn is rendered and learned
    # ... <s> assistant : | < think > bad < / think > negative </s>  (< > / are unknown words; think is 1425)
    assert enc["labels"][-13:] == [M, M, M, 1, 1425, 1, 95, 1, 1, 1425, 1, 917, 3]
    assert enc["labels"][:-13] == [M, M, M, M, M, M, M, M, M, 1063, 3, M, M, M, M, M, M]


def test_template_whose_turns_merge_into_one_token_is_refused() -> None:
    tok = make_tokenizer("llama")
    tok.chat_template = GLUED_TEMPLATE
    with pytest.raises(DataError, match="message 2's first tokens merge") as err:
        data.encode_chat(tok, CHAT, max_length=64, source="chat.jsonl [train]", row=7)
    assert (err.value.file, err.value.row) == ("chat.jsonl [train]", 7)


# --- row checks ---------------------------------------------------------------------------------------------------

ROW_PROBLEMS = [
    # (recipe data keys, second row, words in the message)
    ({"label_names": LABELS}, {"text": "x", "label": 2}, "label 2 in column 'label' is not a class id 0..1"),
    ({"label_names": LABELS}, {"text": "x", "label": "neutral"}, "label 'neutral'"),
    ({"label_names": LABELS}, {"text": "x", "label": True}, "label True"),
    ({}, {"text": "  ", "label": 0}, "column 'text' is empty"),
    ({"target_column": "y"}, {"text": "x", "y": None}, "column 'y' is empty"),
    ({"messages_column": "m"}, {"m": []}, "messages must be a non-empty list"),
    ({"messages_column": "m"}, {"m": [{"role": "user"}]}, "each message needs 'role' and 'content'"),
    ({"messages_column": "m"}, {"m": [{"role": "user", "content": "hi"}]}, "no assistant message"),
]


@pytest.mark.parametrize(("keys", "bad", "words"), ROW_PROBLEMS, ids=[p[2][:30] for p in ROW_PROBLEMS])
def test_check_names_the_first_bad_row(tmp_path: Path, keys: dict, bad: dict, words: str) -> None:
    good = {"text": "fine", "label": 1, "y": "t", "m": CHAT}
    file = write_jsonl(tmp_path / "rows.jsonl", [good, {**good, **bad}, {**good, **bad}])
    task = "seq-cls" if not keys.get("target_column") and not keys.get("messages_column") else "causal-lm"
    with pytest.raises(DataError, match=words.replace("(", r"\(")) as err:
        checks.check(recipe(task, path=str(file), **keys))
    assert (err.value.file, err.value.row) == (f"{file} [train]", 2)


def test_check_counts_labels_by_id_or_name(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "negative"}, {"text": "c", "label": 1.0}]
    file = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = checks.check(recipe("seq-cls", path=str(file), label_names=LABELS))
    assert (report.splits, report.label_counts, report.columns) == ({"train": 3}, {"1": 2, "0": 1}, ["text", "label"])


def test_missing_column_lists_those_present_and_the_template_using_it(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "rows.jsonl", [{"review": "x", "label": 0}])
    with pytest.raises(DataError, match="missing column 'text'") as err:
        checks.check(recipe(path=str(file), prompt_template=PROMPT))
    assert err.value.row is None
    assert err.value.hint == "columns present: review, label (used by data.prompt_template)"


def test_empty_files_and_splits_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="file is empty") as err:
        checks.check(recipe("seq-cls", path=str(empty)))
    assert err.value.file == str(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="split is empty") as err:
        checks.check(recipe("seq-cls", path=str(blank)))
    assert err.value.file == f"{blank} [train]"
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match="split is empty") as err:
        checks.check(recipe("seq-cls", path=str(rows), train_split="train[2:]"))
    assert err.value.file == f"{rows} [train[2:]]"


@pytest.mark.parametrize("template", ["Review: {text", "Review: {text!z}", "Review: }"])
def test_malformed_prompt_template_names_the_key(template: str) -> None:
    with pytest.raises(RecipeError) as err:
        checks.check(recipe(prompt_template=template))
    assert err.value.key == "data.prompt_template" and "not a valid format string" in str(err.value)


# --- loading splits -----------------------------------------------------------------------------------------------


def _files(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


LOAD_PROBLEMS = [
    # (files written, data.path, split, file named, row named, words in the message)
    ({}, "missing.jsonl", "train", "missing.jsonl", None, "file or folder not found"),
    ({"d/rows.txt": "x\n"}, "d/rows.txt", "train", "d/rows.txt", None, "unsupported file type '.txt'"),
    ({"d/notes.md": "x\n"}, "d", "train", "d", None, "no .jsonl/.json/.csv/.parquet files"),
    ({"d/train.jsonl": "{}\n", "d/dev.csv": "a\n1\n"}, "d", "train", "d", None, "mixes file types"),
    (
        {"r.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": \n{"text": "c", "label": 0}\n'},
        "r.jsonl",
        "train",
        "r.jsonl",
        2,
        "not valid JSON",
    ),
    ({"r.jsonl": '{"text": "a", "label": 1}\n\n[1, 2]\n'}, "r.jsonl", "train", "r.jsonl", 3, "not a JSON object"),
    (
        {"d/train.jsonl": '{"text": "a"}\n', "d/validation.jsonl": '{"text": "a"}\n{"text": "b"\n'},
        "d",
        "train",
        "d/validation.jsonl",
        2,
        "not valid JSON",
    ),
    ({"r.csv": "text,label\na,1\nb,2,3\n"}, "r.csv", "train", "r.csv", None, "Expected 2 fields in line 3, saw 3"),
    ({"r.parquet": "not parquet"}, "r.parquet", "train", "r.parquet", None, "cannot parse: Parquet magic bytes"),
    ({"r.jsonl": '{"text": "a"}\n'}, "r.jsonl", "test", "r.jsonl", None, "has no split 'test'"),
    ({"r.jsonl": '{"text": "a"}\n'}, "r.jsonl", "train[:80%", "r.jsonl", None, "is not a split expression"),
]


@pytest.mark.parametrize(
    ("files", "path", "split", "named", "row", "words"), LOAD_PROBLEMS, ids=[p[5][:24] for p in LOAD_PROBLEMS]
)
def test_load_split_errors_name_file_and_line(
    tmp_path: Path, files: dict, path: str, split: str, named: str, row: int | None, words: str
) -> None:
    root = _files(tmp_path, files)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace("[", r"\[")) as err:
        loading.load_split(DataSection(path=str(root / path)), split)
    assert (err.value.file, err.value.row) == (str(root / named), row)


def test_unknown_split_of_a_folder_lists_the_available_ones(tmp_path: Path) -> None:
    root = _files(tmp_path, {"train.jsonl": '{"text": "a"}\n', "dev.jsonl": '{"text": "b"}\n'})
    with pytest.raises(DataError, match="has no split 'test'") as err:
        loading.load_split(DataSection(path=str(root)), "test")
    assert err.value.hint == "available splits: train, validation"


def test_a_bug_while_loading_is_not_reported_as_bad_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    file = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        loading.load_split(DataSection(path=str(file)), "train")


def test_out_of_memory_inside_the_loader_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    file = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}])

    def out_of_memory(*args: object, **kwargs: object) -> None:
        try:
            raise MemoryError("no room for the arrow table")
        except MemoryError as exc:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from exc

    monkeypatch.setattr(datasets, "load_dataset", out_of_memory)
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as err:
        loading.load_split(DataSection(path=str(file)), "train")
    assert isinstance(err.value.__cause__, MemoryError)


def test_cli_exit_status_bad_data_2_loader_bug_1(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from ia3cli.cli.app import app
    from tests.conftest import tiny_recipe, write_recipe

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    raw = tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", tmp_path / "out", data={"path": str(bad)})
    raw["data"].update(eval_split=None, train_samples=None)
    raw["training"].update(eval_strategy="no")
    path = write_recipe(tmp_path / "r.yaml", raw)
    runner = CliRunner()

    malformed = runner.invoke(app, ["validate", str(path)])
    assert malformed.exit_code == 2
    assert f"error: {bad}, row 2: not valid JSON" in malformed.output

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    bug = runner.invoke(app, ["validate", str(path)])
    assert bug.exit_code == 1
    assert "error: RuntimeError: a bug" in bug.output and "--debug" in bug.output


# --- small helpers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (1, 1), (2, None), (-1, None), (1.0, 1), (1.5, None), (True, None), ("positive", 1), ("x", None)],
)
def test_label_id(value: object, expected: int | None) -> None:
    assert data.label_id(value, DataSection(path="d", label_names=LABELS), 2) == expected


@pytest.mark.parametrize(
    ("prompt", "target", "joined"),
    [("Sentiment:", "positive", " positive"), ("Sentiment: ", "positive", "positive"), ("A:", " yes", " yes")],
)
def test_join_target_adds_one_space_only_when_needed(prompt: str, target: str, joined: str) -> None:
    assert data.join_target(prompt, target) == joined
