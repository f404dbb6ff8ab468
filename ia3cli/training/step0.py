"""The step-0 evaluation must measure the untouched model without changing how it is then trained.

Iterating a ``DataLoader`` without a generator draws its base seed from the global torch RNG (``_BaseDataLoaderIter``
in torch 2.x), so the evaluation the Trainer runs before the first step (``TrainingArguments.eval_on_start``) moves
the RNG that dropout and the training sampler draw from next: the same recipe would train a different adapter with
``training.eval_on_start`` on and off. :class:`KeepRngAcrossStep0` puts the RNG states back once that evaluation
is over, so both train the same adapter.
"""

from __future__ import annotations

import random
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (where present) CUDA generators' states."""
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class KeepRngAcrossStep0(TrainerCallback):
    """Saves the RNG states when a fresh run begins with a step-0 evaluation and restores them when it ends.

    The Trainer (transformers 5) calls ``on_train_begin``, then the step-0 ``evaluate`` (whose last act is
    ``on_evaluate``), then starts the first epoch; nothing else draws in between.
    """

    def __init__(self) -> None:
        self._saved: dict[str, Any] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._saved = rng_states() if args.eval_on_start and state.global_step == 0 else None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._saved is not None and state.global_step == 0:
            set_rng_states(self._saved)
            self._saved = None
