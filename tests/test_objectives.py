"""The T-Few loss terms against values computed by hand, and their gradients on a tiny IA3 model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ia3cli.training import objectives
from ia3cli.training.objectives import by_row, choice_terms
from tests.conftest import SENTIMENT, tiny_recipe


def _logp(row: list[float], token: int) -> float:
    return row[token] - math.log(sum(math.exp(x) for x in row))


# One row, two choices of different lengths (logits aligned with labels, as for an encoder-decoder):
#   choice 0 (correct): one target token (id 1);  choice 1 (wrong): two target tokens (ids 2, 0)
LOGITS = [
    [[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0], [1.0, 0.0, -1.0]],
]
LABELS = [[1, -100], [2, 0]]
A = _logp(LOGITS[0][0], 1)  # 0.5 - log(e^2 + e^0.5 + e^-1) = -1.7413...
B, C = _logp(LOGITS[1][0], 2), _logp(LOGITS[1][1], 0)  # -1.5514..., -0.4076...
SCORES = [-A, -(B + C) / 2]  # summed token cross-entropy / token count
HAND = {
    "lm": -A,
    "ln": -(-SCORES[0] - math.log(math.exp(-SCORES[0]) + math.exp(-SCORES[1]))),
    "ul": -(math.log(1 - math.exp(B) + 0.01) + math.log(1 - math.exp(C) + 0.01)) / 2,
}


def test_hand_values_are_what_they_say() -> None:
    """The hand-computed reference itself, to four decimals (so a slip in the helper above shows)."""
    assert (round(A, 4), round(B, 4), round(C, 4)) == (-1.7413, -1.5514, -0.4076)
    assert {k: round(v, 4) for k, v in HAND.items()} == {"lm": 1.7413, "ln": 1.1449, "ul": 0.6452}


@pytest.mark.parametrize("term", ["lm", "ln", "ul"])
def test_each_term_matches_the_hand_computed_value(term: str) -> None:
    terms = choice_terms(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor([2]), torch.tensor([0]), shift=False)
    assert getattr(terms, term).item() == pytest.approx(HAND[term], abs=1e-5)
    assert terms.scores.tolist()[0] == pytest.approx([-s for s in SCORES], abs=1e-5)
    assert terms.total((1, 1, 1)).item() == pytest.approx(sum(HAND.values()), abs=1e-5)
    assert terms.total((0, 2, 0)).item() == pytest.approx(2 * HAND["ln"], abs=1e-5)


def test_decoder_only_logits_are_shifted_by_one() -> None:
    """Causal LMs predict token t at position t - 1: the same numbers one position later give the same terms."""
    logits = torch.cat([torch.tensor(LOGITS), torch.randn(2, 1, 3)], dim=1)  # the last position predicts nothing
    labels = torch.tensor([[-100, *row] for row in LABELS])
    terms = choice_terms(logits, labels, torch.tensor([2]), torch.tensor([0]), shift=True)
    assert (terms.lm.item(), terms.ln.item(), terms.ul.item()) == pytest.approx(
        (HAND["lm"], HAND["ln"], HAND["ul"]), abs=1e-5
    )


def test_rows_with_different_numbers_of_choices() -> None:
    """Row 0 has 2 choices (correct 1), row 1 has 3 (correct 2); ln is the mean of the two rows' cross-entropies."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 6)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100], [4, 4, 4], [5, -100, -100], [0, 1, -100]])
    counts, correct = torch.tensor([2, 3]), torch.tensor([1, 2])
    terms = choice_terms(logits, labels, counts, correct, shift=False)

    lp = [[_logp(logits[i, t].tolist(), int(y)) for t, y in enumerate(labels[i]) if y >= 0] for i in range(5)]
    score = [-sum(x) / len(x) for x in lp]
    rows = [[0, 1], [2, 3, 4]]

    def ce(row: list[int], gold: int) -> float:
        return -(-score[row[gold]] - math.log(sum(math.exp(-score[j]) for j in row)))

    right, wrong = [1, 4], [0, 2, 3]
    lm = -sum(sum(lp[i]) for i in right) / sum(len(lp[i]) for i in right)
    ul = -sum(math.log(1 - math.exp(x) + 0.01) for i in wrong for x in lp[i]) / sum(len(lp[i]) for i in wrong)
    assert terms.lm.item() == pytest.approx(lm, abs=1e-5)
    assert terms.ln.item() == pytest.approx((ce(rows[0], 1) + ce(rows[1], 2)) / 2, abs=1e-5)
    assert terms.ul.item() == pytest.approx(ul, abs=1e-5)
    assert terms.scores.shape == (2, 3) and terms.scores[0, 2].item() == objectives.PAD_SCORE


def test_by_row_pads_short_rows() -> None:
    grid = by_row(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([2, 3]), fill=-9.0)
    assert grid.tolist() == [[1.0, 2.0, -9.0], [3.0, 4.0, 5.0]]


def test_unlikelihood_is_zero_without_wrong_choices() -> None:
    """A row with a single choice has nothing to push down; the term is 0 and keeps the graph."""
    logits = torch.randn(1, 2, 4, requires_grad=True)
    terms = choice_terms(logits, torch.tensor([[1, 2]]), torch.tensor([1]), torch.tensor([0]), shift=False)
    assert terms.ul.item() == 0.0 and terms.ln.item() == pytest.approx(0.0, abs=1e-6)
    terms.total().backward()
    assert logits.grad is not None


# --- on a tiny IA3-wrapped model ----------------------------------------------------------------------------------


def _tiny_choice_batch(tiny_model, task: str, tmp_path: Path):
    from ia3cli.config.load import validate_mapping
    from ia3cli.data.encoding import choice_label
    from ia3cli.data.sources import load_split, sample
    from ia3cli.models import targets
    from ia3cli.scoring.evaluation import choice_features
    from ia3cli.training import row_data
    from ia3cli.tuners import ia3

    kind = "llama" if task == "causal-lm" else "t5"
    recipe = validate_mapping(
        tiny_recipe(tiny_model(kind, task), task, tmp_path / "run", training={"objective": "tfew"})
    )
    plan = targets.resolve(recipe.model, recipe.adapter, task, recipe.num_labels)
    model, tokenizer = ia3.build(recipe, plan)
    rows = list(sample(load_split(recipe.data, "train"), 4, 0))
    feats = [{"choices": choice_features(r, recipe, tokenizer), "label": choice_label(r, recipe.data)} for r in rows]
    batch = row_data.ChoiceCollator(lambda f: f, tokenizer.pad_token_id)(feats)
    return recipe, model, tokenizer, rows, batch


def _terms(model, batch: dict, task: str) -> objectives.ChoiceTerms:
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task == "seq2seq":
        kw["labels"] = batch["labels"]
    logits = model(**kw).logits
    return choice_terms(
        logits, batch["labels"], batch["choice_counts"], batch["choice_labels"], shift=task == "causal-lm"
    )


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
@pytest.mark.parametrize("term", ["lm", "ln", "ul"])
def test_gradients_reach_only_the_trainable_ia3_vectors(tiny_model, tmp_path: Path, task: str, term: str) -> None:
    _, model, _, _, batch = _tiny_choice_batch(tiny_model, task, tmp_path)
    assert SENTIMENT.is_dir() and batch["choice_counts"].tolist() == [2, 2, 2, 2]
    getattr(_terms(model, batch, task), term).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ia3 = {n for n in trainable if ".ia3_l." in n}
    assert with_grad == trainable == ia3
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in ia3), term


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
def test_training_scores_equal_rank_classification_scores(tiny_model, tmp_path: Path, task: str) -> None:
    """The scores the loss ranks are the ones ``ia3 eval`` ranks: -(mean token cross-entropy) of each choice."""
    from ia3cli.scoring.evaluation import score_choices

    recipe, model, tokenizer, rows, batch = _tiny_choice_batch(tiny_model, task, tmp_path)
    model.eval()
    with torch.no_grad():
        trained = _terms(model, batch, task).scores
        ranked = score_choices(model, tokenizer, recipe, rows, batch_size=3)
    assert trained.tolist() == [pytest.approx(r, abs=1e-4) for r in ranked]
