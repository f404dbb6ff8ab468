"""The training rows of choice tasks and prompt templates (the datasets and collator the training story plugs in).

- ``RowDataset``: rows encoded on access, so each row gets a prompt template drawn per epoch (seeded by row and
  epoch, hence the same after ``--resume``) from ``data.prompt_templates``.
- Choice rows: every choice of a row encoded as training encodes targets, ``{"choices": [...], "label": i}``;
  ``ChoiceCollator`` flattens a batch of them to one padded ``(rows x choices, length)`` batch.
- They are trained by :class:`ia3cli.training.choice_trainer.ChoiceTrainer`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ia3cli.scoring.loglik import pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ia3cli.config.recipe import Recipe
    from ia3cli.data.checks import DataReport


def applies(recipe: Recipe) -> bool:
    """Whether training needs these pieces: a choice task, several prompt templates, or the tfew objective."""
    return recipe.has_choices or bool(recipe.data.prompt_templates)


class RowDataset(torch.utils.data.Dataset):
    """Raw rows encoded on access; ``set_epoch`` changes which template each row draws."""

    def __init__(self, rows: list[dict[str, Any]], encode: Callable[[dict[str, Any], str | None], dict], **kw: Any):
        """Args:
        rows: The split's raw rows.
        encode: ``encode(row, template)`` -> features.
        templates: Templates to draw from (``None``: the evaluation template, always).
        seed: Seed of the draws.
        """
        self.rows, self.encode = rows, encode
        self.templates: list[str] | None = kw.get("templates")
        self.seed: int = kw.get("seed", 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw templates for this epoch."""
        self.epoch = epoch

    def template(self, index: int) -> str | None:
        """The template of row ``index`` in the current epoch (a pure function of seed, epoch and index)."""
        if not self.templates:
            return None
        return random.Random(f"{self.seed}:{self.epoch}:{index}").choice(self.templates)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encode(self.rows[index], self.template(index))


class TemplateEpochs(TrainerCallback):
    """Tells the training ``RowDataset`` which epoch starts (also the resumed one, from the restored state)."""

    def __init__(self, dataset: RowDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.set_epoch(int(state.epoch + 1e-6))


class ChoiceCollator:
    """Choice rows -> one padded batch of all their choices plus ``choice_counts`` and ``choice_labels``; other
    features go to ``fallback`` (the task's usual dynamic-padding collator)."""

    def __init__(self, fallback: Callable[[list[dict]], dict], pad_token_id: int):
        self.fallback, self.pad_token_id = fallback, pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from ia3cli.scoring.loglik import pad_batch

        if "choices" not in features[0]:
            return self.fallback(features)
        flat = [{k: c[k] for k in ("input_ids", "attention_mask", "labels")} for f in features for c in f["choices"]]
        batch = pad_batch(flat, self.pad_token_id)
        batch["choice_counts"] = torch.tensor([len(f["choices"]) for f in features])
        batch["choice_labels"] = torch.tensor([f["label"] for f in features])
        return batch


def build_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, report: DataReport) -> tuple[Any, Any, Any]:
    """Train and eval datasets plus collator for ``applies(recipe)``: choice rows where the objective or the
    evaluation needs them, plain encoded rows (with drawn templates) otherwise."""
    from ia3cli.data.encoding import choice_label, collator, encode_row, tokenize
    from ia3cli.scoring.evaluation import choice_features

    d, seed = recipe.data, recipe.training.seed

    def as_choices(row: dict[str, Any], template: str | None) -> dict[str, Any]:
        return {"choices": choice_features(row, recipe, tokenizer, template), "label": choice_label(row, d)}

    def as_target(row: dict[str, Any], template: str | None) -> dict[str, Any]:
        return encode_row(row, recipe, tokenizer, template)

    train_rows = list(report.train)
    if recipe.training.objective == "tfew":
        train = RowDataset(train_rows, as_choices, templates=d.prompt_templates, seed=seed)
    elif d.prompt_templates:
        train = RowDataset(train_rows, as_target, templates=d.prompt_templates, seed=seed)
    else:
        train = tokenize(report.train, recipe, tokenizer)
    evals = None
    if report.eval is not None:
        evals = (
            RowDataset(list(report.eval), as_choices)
            if recipe.has_choices
            else tokenize(report.eval, recipe, tokenizer)
        )
    pad = pad_id(tokenizer)
    return train, evals, ChoiceCollator(collator(recipe, tokenizer), pad)
