"""In-context learning, the IA3 paper's main baseline: demonstrations prepended to every prompt, no training.

A demonstration is a training row rendered exactly as training renders it: the recipe's prompt template (or the
text column), its target (the label's verbaliser or ``target_column``) and the EOS token. Demonstrations are
separated by :data:`SEPARATOR` and put in front of each evaluation prompt, which is then scored by rank
classification like any other model. The number of demonstrations k is given, or as many as fit (in the sample's
order) in a context of :data:`CONTEXT_FACTOR` x ``data.max_length`` tokens next to the longest evaluation prompt
and choice; either way capped by the model's position limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ia3cli.config.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONTEXT_FACTOR = 4
SEPARATOR = "\n\n"


def demonstration(row: dict[str, Any], recipe: Recipe, eos: str = "") -> str:
    """A training row as prompt + target text (+ ``eos``), joined the way training joins them."""
    from ia3cli.data.encoding import join_target, prompt_text, target_text

    prompt = prompt_text(row, recipe.data)
    return prompt + join_target(prompt, target_text(row, recipe.data, recipe.num_labels)) + eos


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def recipe_with_demonstrations(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    k: int | None = None,
) -> tuple[Recipe, int]:
    """A copy of ``recipe`` whose prompt template starts with k demonstrations from ``train_rows``.

    Args:
        recipe: A causal-lm recipe with ``data.label_names``.
        tokenizer: The base model's tokenizer (lengths are counted in its tokens).
        model: The base model (its position limit caps the context).
        train_rows: Candidate demonstrations, used in order.
        eval_rows: The rows that will be scored (the longest decides the room left).
        k: Demonstrations wanted; None for as many as fit.

    Returns:
        The new recipe (its ``data.max_length`` raised so nothing is cut) and the k actually used.
    """
    from ia3cli.data.encoding import encode_causal, prompt_text, row_choices

    d = recipe.data
    template = d.prompt_template or "{" + d.text_column + "}"
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9

    def longest(data: Any) -> int:
        """Tokens of the longest evaluation prompt + choice + EOS, uncut."""
        return max(
            len(encode_causal(tokenizer, prompt_text(row, data), choice, 10**9)["input_ids"])
            for row in eval_rows
            for choice in row_choices(row, data)
        )

    # Training appends EOS to every target and rank classification scores "choice + EOS": so do the demonstrations.
    demos = [demonstration(row, recipe, tokenizer.eos_token or "") for row in train_rows]
    sep = len(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + sep for text in demos]
    room = min(CONTEXT_FACTOR * d.max_length if k is None else limit, limit) - longest(d)
    wanted = len(demos) if k is None else min(k, len(demos))
    used, total = 0, 0
    while used < wanted and total + lengths[used] <= room:
        total += lengths[used]
        used += 1
    prefix = SEPARATOR.join(demos[:used]) + SEPARATOR if used else ""
    new = recipe.model_copy(deep=True)
    new.data.prompt_template = _escape(prefix) + template
    # Measured on the joined text (tokens can merge across a join), so no prompt is cut: every row then starts with
    # the same demonstrations, which rank classification runs once (scoring.sequence_logprobs, share_prefix).
    new.data.max_length = min(max(d.max_length, longest(new.data)), limit)
    return new, used
