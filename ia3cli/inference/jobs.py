"""Run prediction jobs through a :class:`~ia3cli.tuners.mixed.MixedIA3`: encode, batch by length, one forward per batch.

Each job carries its adapter; a batch mixes adapters freely (``MixedIA3.select`` gives every row its own
vectors and head). Three kinds of job (see :mod:`ia3cli.inference.predict`):

- ``classify``: seq-cls; softmax over the head's logits.
- ``choose``: rank classification; every choice is encoded as training encodes a target (``encode_causal``: the
  prompt, the joined choice and EOS; seq2seq: the choice as labels), scored by the mean log-probability of its
  tokens (as ``ia3 eval`` scores verbalisers), and the scores are turned into probabilities by a softmax.
- ``generate``: ``model.generate`` with ``num_beams=1``; decoder-only prompts are left-padded, a prompt too long
  for ``data.max_length`` is cut from the left (as training cuts it), seq2seq inputs are truncated on the right.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.models.device import to_inputs
from ia3cli.scoring.loglik import length_batches, pad_batch, pad_id

if TYPE_CHECKING:
    from ia3cli.inference.rows import Job
    from ia3cli.tuners.mixed import MixedIA3


def load(named: dict[str, Path], used: Sequence[str], device: str | None = None) -> MixedIA3:
    """The base of the first used adapter on ``device``, with every used adapter registered under its name.

    Raises:
        Ia3Error: naming an adapter that cannot join the others (another base, task or targets) or is broken.
    """
    from ia3cli.tuners.mixed import MixedIA3

    mixed = MixedIA3.from_run(named[used[0]], name=used[0], device=device)
    for name in used[1:]:
        mixed.add(name, named[name])
    return mixed


class Progress:
    """Prints ``predicted N/M rows`` at every tenth of the way and at the end."""

    def __init__(self, total: int, printer: Callable[[str], None]) -> None:
        self.total, self.done, self.shown, self.printer = total, 0, 0, printer

    def advance(self, n: int) -> None:
        self.done += n
        tenth = self.done * 10 // max(self.total, 1)
        if tenth > self.shown or self.done == self.total:
            self.shown = tenth
            self.printer(f"predicted {self.done}/{self.total} rows")


def run(
    mixed: MixedIA3,
    jobs: list[Job],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    printer: Callable[[str], None],
) -> None:
    """Fill ``job.result`` (``prediction``, and ``probabilities`` for classify/choose) for every job.

    Args:
        mixed: The base with the jobs' adapters registered.
        jobs: Valid rows with their adapter and kind.
        batch_size: Rows per forward (sequences, for choose).
        max_new_tokens: Generation length.
        temperature: 0 for greedy, else sampling temperature.
        top_p: Nucleus sampling threshold.
        seed: Seeds torch before the first batch.
        printer: Receives progress lines.
    """
    import torch

    torch.manual_seed(seed)
    progress = Progress(len(jobs), printer)
    with torch.inference_mode():
        _classify(mixed, [j for j in jobs if j.kind == "classify"], batch_size, progress)
        _choose(mixed, [j for j in jobs if j.kind == "choose"], batch_size, progress)
        gen = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": temperature > 0}
        if temperature > 0:
            gen.update(temperature=temperature, top_p=top_p)
        _generate(mixed, [j for j in jobs if j.kind == "generate"], batch_size, gen, progress)


def _classify(mixed: MixedIA3, jobs: list[Job], batch_size: int, progress: Progress) -> None:
    tok, model = mixed.tokenizer, mixed.model
    feats = [
        tok(j.text, j.pair, truncation=True, max_length=mixed.adapter_recipe(j.adapter).data.max_length)["input_ids"]
        for j in jobs
    ]
    for idx in length_batches(len(feats), [len(f) for f in feats], batch_size):
        batch = pad_batch([_ids(feats[i]) for i in idx], pad_id(mixed.tokenizer))
        batch = to_inputs(batch, model)
        with mixed.select([jobs[i].adapter for i in idx]):
            probs = model(**batch).logits.float().softmax(-1).cpu()
        for i, p in zip(idx, probs, strict=True):
            names = mixed.adapter_recipe(jobs[i].adapter).data.label_names
            names = names or [str(model.config.id2label.get(c, c)) for c in range(len(p))]
            best = int(p.argmax())
            jobs[i].result = {"prediction": names[best], "probabilities": dict(zip(names, p.tolist(), strict=True))}
        progress.advance(len(idx))


def _choose(mixed: MixedIA3, jobs: list[Job], batch_size: int, progress: Progress) -> None:
    from ia3cli.data.encoding import encode_target
    from ia3cli.scoring.loglik import mean_logprobs

    tok, model = mixed.tokenizer, mixed.model
    feats, owner = [], []
    for n, j in enumerate(jobs):
        max_length = mixed.adapter_recipe(j.adapter).data.max_length
        for choice in j.choices or []:
            feats.append(encode_target(tok, mixed.task, j.text or "", choice, max_length))
            owner.append(n)
    scores: list[list[float]] = [[] for _ in jobs]
    remaining = [len(j.choices or []) for j in jobs]

    def select(idx: list[int]) -> Any:
        for i in idx:  # a job is done when its last choice is scored
            remaining[owner[i]] -= 1
        progress.advance(sum(remaining[n] == 0 for n in {owner[i] for i in idx}))
        return mixed.select([jobs[owner[i]].adapter for i in idx])

    means = mean_logprobs(model, feats, pad_id(mixed.tokenizer), batch_size, select=select)
    for i, n in enumerate(owner):
        scores[n].append(means[i])
    for j, s in zip(jobs, scores, strict=True):
        choices, probs = j.choices or [], softmax(s)
        best = probs.index(max(probs))
        j.result = {"prediction": choices[best], "probabilities": dict(zip(choices, probs, strict=True))}


def _ids(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _prompt_ids(mixed: MixedIA3, job: Job) -> list[int]:
    tok = mixed.tokenizer
    max_length = mixed.adapter_recipe(job.adapter).data.max_length
    if job.messages is not None:
        text = tok.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"][-max_length:]
    if mixed.task == "seq2seq":
        return tok(job.text, truncation=True, max_length=max_length)["input_ids"]
    return tok(job.text, add_special_tokens=True)["input_ids"][-max_length:]


def _generate(mixed: MixedIA3, jobs: list[Job], batch_size: int, gen: dict[str, Any], progress: Progress) -> None:
    tok, model = mixed.tokenizer, mixed.model
    decoder_only = mixed.task == "causal-lm"
    feats = [_prompt_ids(mixed, j) for j in jobs]
    for idx in length_batches(len(feats), [len(f) for f in feats], batch_size):
        batch = pad_batch([_ids(feats[i]) for i in idx], pad_id(mixed.tokenizer), left=decoder_only)
        batch = to_inputs(batch, model)
        with mixed.select([jobs[i].adapter for i in idx]):
            out = model.generate(**batch, **gen, pad_token_id=pad_id(mixed.tokenizer))
        if decoder_only:
            out = out[:, batch["input_ids"].shape[1] :]
        for i, ids in zip(idx, out.tolist(), strict=True):
            jobs[i].result = {"prediction": tok.decode(ids, skip_special_tokens=True).strip()}
        progress.advance(len(idx))


def softmax(scores: Sequence[float]) -> list[float]:
    """Probabilities from scores (stable for large magnitudes)."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]
