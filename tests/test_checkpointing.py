"""training.gradient_checkpointing on a frozen base: for every task the loss and the IA3 gradients equal those
without checkpointing, and the blocks really are recomputed in the backward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ia3cli.config.load import validate_mapping
from ia3cli.models import targets
from ia3cli.tuners import ia3
from tests.conftest import tiny_recipe

# A module inside the first block: checkpointing recomputes the block's forward in the backward pass, so it runs twice
CASES = [
    ("llama", "causal-lm", "layers.0.mlp"),
    ("bert", "seq-cls", "layer.0.intermediate"),
    ("t5", "seq2seq", "encoder.block.0.layer.1"),
]


def _batch(task: str, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # one padded row
    if task == "seq-cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    if task == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(10, vocab, (4, 5), generator=gen)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model_dir: Path, task: str, block: str, checkpointing: bool, tmp: Path) -> tuple:
    raw = tiny_recipe(model_dir, task, tmp / "run", training={"gradient_checkpointing": checkpointing})
    recipe = validate_mapping(raw)
    plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
    torch.manual_seed(0)
    model, _ = ia3.build(recipe, plan)
    with torch.no_grad():  # vectors away from 1, so their gradients depend on the whole forward
        for name, p in model.named_parameters():
            if ".ia3_l." in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    model.train()
    calls = []
    layer = next(m for n, m in model.named_modules() if n.endswith(block))
    layer.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recomputation may stop early
    torch.manual_seed(1)  # dropout: the recomputation replays the same masks
    loss = model(**_batch(task, model.get_input_embeddings().num_embeddings)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".ia3_l." in n or ".modules_to_save." in n for n in grads), "the base is not frozen"
    return float(loss.detach()), grads, len(calls)


@pytest.mark.parametrize(("kind", "task", "block"), CASES)
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_model, tmp_path: Path, kind, task, block) -> None:
    model_dir = tiny_model(kind, task)
    loss, grads, calls = _loss_and_grads(model_dir, task, block, False, tmp_path)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(model_dir, task, block, True, tmp_path)
    assert (calls, calls_ckpt) == (1, 2), "the block was not recomputed in the backward pass"
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any(".ia3_l." in n for n in grads)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
