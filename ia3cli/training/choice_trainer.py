"""``ChoiceTrainer``: a ``Trainer`` for choice tasks. Its loss on choice batches is :mod:`ia3cli.training.objectives`
(``lm`` or ``tfew``), and its evaluation returns each row's choice scores, so rank-classification accuracy/F1 are
computed at every evaluation (and can pick the best checkpoint or stop early). Other batches take the Trainer's own
loss."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ia3cli.training import objectives
from ia3cli.training.row_data import RowDataset


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
