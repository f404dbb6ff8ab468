"""Data: load the splits, check every row, build model inputs, pad per batch.

``check`` runs before any weights are loaded (it is part of ``ia3 validate``): it loads the splits, confirms the
named columns exist and reports the first bad row by number. ``build`` turns rows into token ids for the task:

- ``seq-cls``: text (and text pair) -> ``input_ids``; the label (id or name) -> ``labels``.
- ``causal-lm``: ``prompt_template`` (or the text column) + target (``target_column`` or the label's name) + EOS;
  the loss is masked on the prompt tokens. With ``messages_column``, the tokenizer's chat template renders the
  conversation and only assistant turns carry loss.
- ``seq2seq``: input text -> encoder, target -> ``labels``.

Rows are never padded here: the collator pads each batch to its longest row.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ia3cli.config.recipe import DataSection, Recipe
from ia3cli.data.sources import load_split
from ia3cli.errors import DataError, RecipeError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass
class DataReport:
    """What ``check`` found: split sizes and columns, and the checked splits themselves (reused by ``build``)."""

    source: str
    splits: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    train: Any = field(default=None, repr=False)
    eval: Any = field(default=None, repr=False)


def sample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """``n`` rows drawn with ``seed`` (all rows when ``n`` is None); training and ``ia3 eval`` draw the same ones."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_splits(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """Train and eval splits, subsampled to ``train_samples``/``eval_samples`` with the recipe's seed."""
    d, seed = recipe.data, recipe.training.seed
    train = sample(load_split(d, d.train_split), d.train_samples, seed)
    evals = sample(load_split(d, d.eval_split), d.eval_samples, seed) if d.eval_split else None
    return train, evals


def _template_fields(template: str, key: str = "data.prompt_template") -> list[str]:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(key, f"is not a valid format string: {exc}") from None
    for _, name, _, conversion in parts:
        if conversion not in (None, "r", "s", "a"):
            raise RecipeError(
                key,
                f"is not a valid format string: unknown conversion '!{conversion}' after {{{name}}}",
                "use {column}, {column!r} or {column!s}",
            )
    return [name for _, name, _, _ in parts if name]


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


def _needs_label(recipe: Recipe) -> bool:
    d = recipe.data
    return recipe.model.task == "seq-cls" or (d.target_column is None and d.messages_column is None)


def required_columns(recipe: Recipe) -> list[str]:
    """Columns every row must have for this recipe."""
    d = recipe.data
    if d.messages_column:
        return [d.messages_column]
    templates = [t for t in [d.prompt_template, *(d.prompt_templates or [])] if t]
    cols = [f for t in templates for f in _template_fields(t)] if templates else [d.text_column]
    if d.choices_column:
        cols.append(d.choices_column)
    if recipe.model.task == "seq-cls" and d.text_pair_column:
        cols.append(d.text_pair_column)
    if _needs_label(recipe):
        cols.append(d.label_column)
    elif d.target_column:
        cols.append(d.target_column)
    return list(dict.fromkeys(cols))


def check_rows(ds: Dataset, recipe: Recipe, source: str) -> dict[str, int]:
    """Check every row of a split; returns label counts.

    Raises:
        DataError: naming the first bad row (1-based) and column.
    """
    d = recipe.data
    cols = required_columns(recipe)
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        key = next(
            (
                k
                for k, templates in (
                    ("data.prompt_template", [d.prompt_template]),
                    ("data.prompt_templates", d.prompt_templates),
                )
                if any(t and missing[0] in _template_fields(t) for t in templates or [])
            ),
            None,
        )
        hint = f"columns present: {', '.join(ds.column_names)}" + (f" (used by {key})" if key else "")
        raise DataError(source, None, f"missing column '{missing[0]}'", hint)
    counts: dict[str, int] = {}
    n_labels = recipe.num_labels
    for i, row in enumerate(ds, 1):
        if d.messages_column:
            _check_messages(row[d.messages_column], source, i)
            continue
        if d.choices_column:
            _check_choices(row, d, source, i)
        for c in cols:
            v = row[c]
            if c == d.choices_column:
                continue
            if c == d.label_column and _needs_label(recipe) and d.choices_column:
                counts[str(choice_label(row, d))] = counts.get(str(choice_label(row, d)), 0) + 1
            elif c == d.label_column and _needs_label(recipe):
                lid = label_id(v, d, n_labels)
                if lid is None:
                    names = f" or one of {d.label_names}" if d.label_names else ""
                    raise DataError(
                        source,
                        i,
                        f"label {v!r} in column '{c}' is not a class id 0..{n_labels - 1}{names}",
                        "fix the row, or set model.num_labels / data.label_names",
                    )
                counts[str(lid)] = counts.get(str(lid), 0) + 1
            elif v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(source, i, f"column '{c}' is empty", "fill it in or drop the row")
    return counts


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


def _check_choices(row: dict[str, Any], data: DataSection, source: str, i: int) -> None:
    value = row[data.choices_column]
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c.strip() for c in value):
        raise DataError(
            source,
            i,
            f"column '{data.choices_column}' must be a list of at least 2 non-empty strings",
            f"got {value!r}",
        )
    if choice_label(row, data) is None:
        raise DataError(
            source,
            i,
            f"label {row[data.label_column]!r} is neither an index 0..{len(value) - 1} into "
            f"'{data.choices_column}' nor one of its strings",
            "fix the row",
        )


def _check_messages(messages: Any, source: str, row: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(source, row, "messages must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(source, row, "each message needs 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(source, row, "no assistant message to learn from")


def check(recipe: Recipe) -> DataReport:
    """Pre-flight: load the splits and check every row (no model weights needed).

    Raises:
        DataError, RecipeError: naming the file, row or key at fault.
    """
    d = recipe.data
    if d.prompt_template:
        _template_fields(d.prompt_template)
    for template in d.prompt_templates or []:
        _template_fields(template, "data.prompt_templates")
    train, evals = load_splits(recipe)
    report = DataReport(source=d.path, train=train, eval=evals)
    for split, ds in ((d.train_split, train), (d.eval_split, evals)):
        if ds is None:
            continue
        if len(ds) == 0:
            raise DataError(f"{d.path} [{split}]", None, "split is empty")
        counts = check_rows(ds, recipe, f"{d.path} [{split}]")
        report.splits[split] = len(ds)
        for k, v in counts.items():
            report.label_counts[k] = report.label_counts.get(k, 0) + v
    report.columns = list(train.column_names)
    return report


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
    if task == "causal-lm":
        return encode_causal(tokenizer, prompt, target, d.max_length)
    enc = tokenizer(prompt, truncation=True, max_length=d.max_length)
    enc["labels"] = tokenizer(text_target=target, truncation=True, max_length=d.max_length)["input_ids"]
    return dict(enc)


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
