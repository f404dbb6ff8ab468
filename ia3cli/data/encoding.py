"""Encoding: rows into model inputs for the task (the splits are loaded by :mod:`ia3cli.data.sources` and checked
by :mod:`ia3cli.data.checks`). ``build`` turns rows into token ids:

- ``seq-cls``: text (and text pair) -> ``input_ids``; the label (id or name) -> ``labels``.
- ``causal-lm``: ``prompt_template`` (or the text column) + target (``target_column`` or the label's name) + EOS;
  the loss is masked on the prompt tokens. With ``messages_column``, the tokenizer's chat template renders the
  conversation and only assistant turns carry loss.
- ``seq2seq``: input text -> encoder, target -> ``labels``.

Rows are never padded here: the collator pads each batch to its longest row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ia3cli.config.recipe import DataSection, Recipe
from ia3cli.data.sources import load_splits
from ia3cli.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ia3cli.data.checks import DataReport

IGNORE_INDEX = -100


def label_id(value: Any, data: DataSection, num_labels: int) -> int | None:
    """A row's label as a class id, or ``None`` when it is not valid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < num_labels else None
    if isinstance(value, str) and data.label_names and value in data.label_names:
        return data.label_names.index(value)
    if isinstance(value, float) and value.is_integer() and 0 <= value < num_labels:
        return int(value)
    return None


def as_choices(value: Any) -> list[str] | None:
    """``value`` as a row's answer choices: a list of at least two non-blank strings, else ``None``."""
    if isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) and c.strip() for c in value):
        return value
    return None


def row_choices(row: dict[str, Any], data: DataSection) -> list[str]:
    """The answer choices of a row: its ``choices_column`` list, else the fixed ``label_names``."""
    if data.choices_column:
        return [str(c) for c in row[data.choices_column]]
    return list(data.label_names or [])


def choice_label(row: dict[str, Any], data: DataSection) -> int | None:
    """Index of the correct choice of a row (the label is an index or the correct string), ``None`` if invalid."""
    choices = row_choices(row, data)
    value = row[data.label_column]
    if isinstance(value, str):
        return choices.index(value) if value in choices else None
    return label_id(value, data, len(choices))


# --- turning rows into model inputs -------------------------------------------------------------------------------


def eval_template(data: DataSection) -> str | None:
    """The template evaluation uses: ``prompt_template``, else the first of ``prompt_templates``."""
    return data.prompt_template or (data.prompt_templates[0] if data.prompt_templates else None)


def prompt_text(row: dict[str, Any], data: DataSection, template: str | None = None) -> str:
    """The input text of a row: ``template`` (default: the evaluation template) filled from the row, or the text."""
    template = template or eval_template(data)
    return template.format(**row) if template else str(row[data.text_column])


def target_text(row: dict[str, Any], data: DataSection, num_labels: int) -> str:
    """The target of a row: ``target_column``, else the correct choice (the label's name)."""
    if data.target_column:
        return str(row[data.target_column])
    if data.choices_column:
        return row_choices(row, data)[choice_label(row, data)]  # type: ignore[index]
    lid = label_id(row[data.label_column], data, num_labels)
    return data.label_names[lid]  # type: ignore[index]


def join_target(prompt: str, target: str) -> str:
    """Separate prompt and target by a space unless one of them already provides whitespace."""
    return target if not prompt or prompt[-1].isspace() or target[:1].isspace() else " " + target


def encode_causal(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int) -> dict[str, list]:
    """Token ids of prompt + target + EOS, with the prompt masked out of the labels.

    When too long, the prompt is cut from the left so the target (the thing learned) survives.
    """
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(join_target(prompt, target), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        t_ids = t_ids + [tokenizer.eos_token_id]
    t_ids = t_ids[:max_length]
    p_ids = p_ids[-(max_length - len(t_ids)) :] if max_length > len(t_ids) else []
    ids = p_ids + t_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p_ids) + t_ids}


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    *,
    source: str = "messages",
    row: int | None = None,
) -> dict[str, list]:
    """Render a conversation with the chat template; only assistant turns carry loss.

    The template renders the conversation up to each assistant turn (with the generation prompt) and through it;
    the tokens each render adds are that turn's. This holds only when every render extends the one before: some
    templates rewrite earlier turns once later ones exist (Qwen3's drops the ``<think>`` part of all but the last
    assistant turn), which would shift the loss mask. Such a row is refused rather than masked wrongly.

    Args:
        tokenizer: Tokenizer with a chat template.
        messages: The row's ``[{role, content}, ...]``.
        max_length: Truncate to this many tokens.
        source: File (and split) named in errors.
        row: 1-based row named in errors.

    Raises:
        DataError: when a render does not extend the previous one.
    """

    def render(msgs: list[dict], gen_prompt: bool) -> tuple[str, list[int]]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    def extend(prev_text: str, prev_ids: list[int], msgs: list[dict], gen_prompt: bool) -> tuple[str, list[int]]:
        text, new_ids = render(msgs, gen_prompt)
        turn = len(msgs)
        if not text.startswith(prev_text):
            raise DataError(
                source,
                row,
                f"the chat template rewrites earlier turns once message {turn} follows them, so the assistant "
                "turns cannot be located by rendering the conversation turn by turn",
                "use a template that renders earlier turns unchanged (e.g. keep reasoning out of earlier assistant "
                "messages), or split the conversation into one row per assistant turn",
            )
        if new_ids[: len(prev_ids)] != prev_ids:
            raise DataError(
                source,
                row,
                f"message {turn}'s first tokens merge with the text before it, so the loss mask cannot start "
                "at a token boundary",
                "make the chat template end each turn with a separator (newline or special token)",
            )
        return text, new_ids

    text, ids = "", []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        text, before = extend(text, ids, messages[:i], True)
        labels += [IGNORE_INDEX] * (len(before) - len(ids))
        text, after = extend(text, before, messages[: i + 1], False)
        labels += after[len(before) :]
        ids = after
    return {
        "input_ids": ids[:max_length],
        "attention_mask": [1] * min(len(ids), max_length),
        "labels": labels[:max_length],
    }


def encode_row(
    row: dict[str, Any],
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None = None,
    *,
    source: str | None = None,
    index: int | None = None,
) -> dict[str, list]:
    """One row -> model inputs for the recipe's task (``template`` replaces the evaluation template); ``source`` and
    1-based ``index`` name the row in errors."""
    d, task = recipe.data, recipe.model.task
    if task == "seq-cls":
        pair = row[d.text_pair_column] if d.text_pair_column else None
        enc = tokenizer(prompt_text(row, d, template), pair, truncation=True, max_length=d.max_length)
        return {**enc, "labels": label_id(row[d.label_column], d, recipe.num_labels)}
    if d.messages_column:
        return encode_chat(tokenizer, row[d.messages_column], d.max_length, source=source or d.path, row=index)
    prompt, target = prompt_text(row, d, template), target_text(row, d, recipe.num_labels)
    return encode_target(tokenizer, task, prompt, target, d.max_length)


def encode_target(
    tokenizer: PreTrainedTokenizerBase, task: str, prompt: str, target: str, max_length: int
) -> dict[str, list]:
    """Model inputs whose labels are ``target`` after ``prompt``, for a generative task: what training learns, and
    what rank classification scores each choice by. causal-lm: :func:`encode_causal`; seq2seq: the prompt as encoder
    input and the target as labels."""
    if task == "causal-lm":
        return encode_causal(tokenizer, prompt, target, max_length)
    enc = dict(tokenizer(prompt, truncation=True, max_length=max_length))
    enc["labels"] = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"]
    return enc


def tokenize(ds: Dataset, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, source: str | None = None) -> Dataset:
    """Tokenize a split (no padding), dropping the raw columns; ``source`` names the split in errors."""
    return ds.map(
        lambda row, i: encode_row(row, recipe, tokenizer, source=source, index=i + 1),
        with_indices=True,
        remove_columns=ds.column_names,
        desc="tokenizing",
        load_from_cache_file=False,
    )


def collator(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Any:
    """Dynamic-padding collator: each batch is padded to its longest row only."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.model.task == "seq-cls":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def build(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, report: DataReport | None = None
) -> tuple[Dataset, Dataset | None, Any]:
    """Tokenized train and eval splits plus the collator; the splits ``check`` already loaded are reused."""
    train, evals = (report.train, report.eval) if report is not None else load_splits(recipe)
    d = recipe.data
    train_t = tokenize(train, recipe, tokenizer, f"{d.path} [{d.train_split}]")
    eval_t = tokenize(evals, recipe, tokenizer, f"{d.path} [{d.eval_split}]") if evals is not None else None
    return train_t, eval_t, collator(recipe, tokenizer)
