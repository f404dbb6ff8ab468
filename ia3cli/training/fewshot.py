"""Few-shot training pieces the training story plugs in for choice tasks and prompt templates.

- ``RowDataset``: rows encoded on access, so each row gets a prompt template drawn per epoch (seeded by row and
  epoch, hence the same after ``--resume``) from ``data.prompt_templates``.
- Choice rows: every choice of a row encoded as training encodes targets, ``{"choices": [...], "label": i}``;
  ``ChoiceCollator`` flattens a batch of them to one padded ``(rows x choices, length)`` batch.
- ``ChoiceTrainer``: a ``Trainer`` whose loss on choice batches is ``ia3cli.training.objectives`` (``lm`` or
  ``tfew``) and
  whose evaluation returns each row's choice scores, so rank-classification accuracy/F1 are computed at every
  evaluation (and can pick the best checkpoint or stop early). Other batches take the Trainer's own loss.
- ``load_init_vectors``: start from the IA3 vectors of an earlier run (``adapter.init_from``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from ia3cli.errors import RecipeError
from ia3cli.scoring.loglik import pad_id
from ia3cli.training import objectives

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


class ChoiceTrainer(Trainer):
    """A Trainer that scores all choices of a row in one forward: the ``objective`` loss on choice batches, and
    per-row choice scores as evaluation predictions (see ``evaluation.choice_trainer_metrics``)."""

    def __init__(self, *args: Any, objective: str = "lm", weights: tuple[float, float, float] = (1, 1, 1), **kw: Any):
        super().__init__(*args, **kw)
        self.objective, self.weights = objective, weights
        if objective == "tfew":
            # The T-Few terms are means over each micro-batch: the Trainer divides them by the accumulation steps
            # (and DDP averages over processes) instead of rescaling by a token count it cannot know.
            self.model_accepts_loss_kwargs = False

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # Choice rows have no single length to group by (transformers 5 groups evaluation batches by length when
        # training does): evaluate them in order, as the Trainer does without grouping.
        if isinstance(eval_dataset, RowDataset):
            return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        return super()._get_eval_sampler(eval_dataset)

    def choice_terms(self, model: Any, inputs: dict[str, torch.Tensor]) -> objectives.ChoiceTerms:
        """Forward all choices of the batch and compute every loss term."""
        seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if seq2seq:
            kw["labels"] = inputs["labels"]  # builds the decoder inputs; its own loss is not used
        logits = model(**kw).logits
        return objectives.choice_terms(
            logits, inputs["labels"], inputs["choice_counts"], inputs["choice_labels"], shift=not seq2seq
        )

    def _loss(self, terms: objectives.ChoiceTerms) -> torch.Tensor:
        return terms.total(self.weights) if self.objective == "tfew" else terms.lm

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The objective on choice batches; the Trainer's own loss otherwise."""
        if "choice_counts" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = self.choice_terms(model, inputs)
        loss = self._loss(terms)
        return (loss, {"scores": terms.scores}) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[Any, Any, Any]:
        """Loss, ``(rows, choices)`` scores and ``(rows, 2)`` (correct choice, number of choices) for choice
        batches, so ``compute_metrics`` can rank-classify."""
        if "choice_counts" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            terms = self.choice_terms(model, inputs)
        loss = self._loss(terms).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, terms.scores, torch.stack([inputs["choice_labels"], inputs["choice_counts"]], -1)


def load_init_vectors(model: Any, run_dir: str) -> int:
    """Copy the IA3 vectors (and any saved head) of an earlier run into ``model``; returns the tensors loaded.

    Raises:
        RecipeError: (``adapter.init_from``) when the run's adapter does not fit the model: other targets, other
            shapes, or a missing file.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(run_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise RecipeError("adapter.init_from", f"{run_dir} has no adapter_model.safetensors", "point it at a run dir")
    saved = load_file(str(path))
    expected = {n.replace(".default", "") for n, p in model.named_parameters() if ".ia3_l." in n}
    present = {k for k in saved if k.endswith("ia3_l")}
    own_shapes = {n.replace(".default", ""): p.shape for n, p in model.named_parameters() if ".ia3_l." in n}
    if present != expected or any(saved[k].shape != own_shapes[k] for k in present):
        missing, extra = sorted(expected - present), sorted(present - expected)
        detail = f"missing {missing[0]}" if missing else (f"unexpected {extra[0]}" if extra else "other shapes")
        raise RecipeError(
            "adapter.init_from",
            f"the IA3 vectors in {run_dir} target other modules than this recipe ({detail})",
            "use the same adapter.target_modules / feedforward_modules as that run",
        )
    set_peft_model_state_dict(model, saved)
    return len(saved)
