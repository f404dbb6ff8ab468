"""Losses for choice tasks: the plain ``lm`` loss and the T-Few objective (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.2).

A choice batch holds every choice of every row, flattened to ``N = sum(choices per row)`` sequences and padded;
``labels`` mark each choice's target tokens (-100 elsewhere). With ``score = summed token cross-entropy / token count``
of each choice:

- ``L_LM``: cross-entropy of the correct choices' tokens (the ``lm`` objective on its own);
- ``L_LN``: cross-entropy over each row's choices with the negated scores as logits (length-normalised ranking);
- ``L_UL``: unlikelihood, ``-sum log(1 - p(token) + 0.01)`` over the wrong choices' tokens divided by their count.

``tfew`` trains ``w_lm * L_LM + w_ln * L_LN + w_ul * L_UL`` (weights 1 in the paper). Everything here is a pure
function of tensors, so it is tested on hand-made logits without a model or a Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ia3cli.scoring.loglik import token_logprobs

if TYPE_CHECKING:
    import torch

UL_EPS = 0.01  # keeps log(1 - p) finite when a wrong token already has probability 1
PAD_SCORE = -1e4  # the negated score of a padded (absent) choice: never ranked first


@dataclass
class ChoiceTerms:
    """The loss terms of one choice batch and each choice's negated score (higher = more likely)."""

    lm: torch.Tensor
    ln: torch.Tensor
    ul: torch.Tensor
    scores: torch.Tensor  # (rows, max choices), PAD_SCORE where a row has fewer choices

    def total(self, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
        """``w_lm * lm + w_ln * ln + w_ul * ul``."""
        w_lm, w_ln, w_ul = weights
        return w_lm * self.lm + w_ln * self.ln + w_ul * self.ul


def choice_scores(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed token cross-entropy divided by its token count, ``(N,)`` (lower = more likely)."""
    return -logp.sum(-1) / mask.sum(-1).clamp(min=1)


def by_row(values: torch.Tensor, counts: torch.Tensor, fill: float) -> torch.Tensor:
    """Regroup flat per-choice values ``(N,)`` into ``(rows, max choices)``, ``fill`` where a row has fewer."""
    import torch

    rows, width = counts.numel(), int(counts.max())
    row_of = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    col_of = torch.arange(values.numel(), device=counts.device) - starts[row_of]
    out = values.new_full((rows, width), fill)
    return out.index_put((row_of, col_of), values)


def correct_mask(counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: which flat choice is its row's correct one."""
    import torch

    starts = torch.cumsum(counts, 0) - counts
    flags = torch.zeros(int(counts.sum()), dtype=torch.bool, device=counts.device)
    flags[starts + labels] = True
    return flags


def lm_loss(logp: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the correct choices' target tokens."""
    tokens = mask[correct]
    return -logp[correct].sum() / tokens.sum().clamp(min=1)


def ln_loss(scores: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over each row's choices with the negated scores as logits, mean over rows."""
    import torch.nn.functional as F

    return F.cross_entropy(by_row(-scores, counts, PAD_SCORE), labels)


def ul_loss(logp: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Unlikelihood of the wrong choices: ``-sum log(1 - p + 0.01)`` over their tokens / their token count."""
    import torch

    wrong = ~correct
    tokens = mask[wrong]
    if not tokens.any():
        return logp.sum() * 0.0  # keeps the graph (and a zero gradient) when no row has a wrong choice
    penalty = -torch.log1p(-logp[wrong].exp() + UL_EPS) * tokens
    return penalty.sum() / tokens.sum()


def choice_terms(
    logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, choice_labels: torch.Tensor, *, shift: bool
) -> ChoiceTerms:
    """All loss terms of a flattened choice batch.

    Args:
        logits: ``(N, T, vocab)`` for the N = ``counts.sum()`` choice sequences.
        labels: ``(N, T)`` target token ids, -100 outside each choice's target.
        counts: ``(rows,)`` number of choices of each row (the flat sequences are row-major).
        choice_labels: ``(rows,)`` index of each row's correct choice.
        shift: as in :func:`ia3cli.scoring.loglik.token_logprobs`.
    """
    logp, mask = token_logprobs(logits, labels, shift=shift)
    correct = correct_mask(counts, choice_labels)
    scores = choice_scores(logp, mask)
    return ChoiceTerms(
        lm=lm_loss(logp, mask, correct),
        ln=ln_loss(scores, counts, choice_labels),
        ul=ul_loss(logp, mask, correct),
        scores=by_row(-scores.detach(), counts, PAD_SCORE),
    )
