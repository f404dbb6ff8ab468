"""Memory per rank from the config alone, and the FSDP plan: a 70B Llama on the ``meta`` device, no weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ia3cli.config.load import validate_mapping
from ia3cli.models import sharding
from ia3cli.models.loading import build_meta_model, load_config
from ia3cli.training import distributed
from tests.conftest import tiny_recipe

GB = 1e9
# Llama-3-70B: hidden 8192, FFN 28672, 80 layers, 64 query heads, 8 key/value heads of 128, vocabulary 128256
H, FFN, LAYERS, HEADS, KV, VOCAB = 8192, 28672, 80, 64, 8 * 128, 128256


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-70b")
    LlamaConfig(
        hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=8192, tie_word_embeddings=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def _recipe(folder: Path, tmp_path: Path, **training):
    raw = tiny_recipe(folder, "causal-lm", tmp_path / "out", training={"batch_size": 1, **training})
    raw["model"]["dtype"] = "bfloat16"
    raw["data"]["max_length"] = 2048
    return validate_mapping(raw)


def test_memory_per_rank_of_a_70b_llama_is_within_10_percent_of_the_hand_count(llama_70b, tmp_path: Path) -> None:
    recipe = _recipe(llama_70b, tmp_path, distributed="fsdp")
    meta = build_meta_model(load_config(recipe.model), "causal-lm")
    fsdp = sharding.estimate(meta, recipe, world=8, fsdp=True, trainable=1_000_000)
    ddp = sharding.estimate(meta, recipe, world=8, fsdp=False, trainable=1_000_000)

    # by hand: 2 bytes a weight; per layer q and o (h x h), k and v (h x 1024), three FFN matrices, two norms
    block = 2 * (2 * H * H + 2 * H * KV + 3 * H * FFN + 2 * H)
    weights = block * LAYERS + 2 * (2 * VOCAB * H + H)  # + embeddings, untied head, final norm: 141 GB
    assert 140 * GB < weights < 142 * GB
    s, b = 2048, 1
    activations = LAYERS * s * b * H * (34 + 5 * HEADS * s / H) + 2 * s * b * VOCAB * 4  # 16-bit, + fp32 logits
    hand_fsdp = weights / 8 + 2 * block + activations  # the shards, two gathered blocks (one prefetched)
    hand_ddp = weights + activations
    assert abs(fsdp.total - hand_fsdp) / hand_fsdp < 0.10, (fsdp, hand_fsdp)
    assert abs(ddp.total - hand_ddp) / hand_ddp < 0.10, (ddp, hand_ddp)
    print(fsdp.line(), ddp.line(), f"by hand: fsdp {hand_fsdp / GB:.1f} GB, ddp {hand_ddp / GB:.1f} GB", sep="\n")
    assert "fsdp over 8 ranks" in fsdp.line() and "GiB" in fsdp.line()
    gathered = _recipe(llama_70b, tmp_path, distributed="fsdp", fsdp_sharding="shard_grad_op")
    assert sharding.estimate(meta, gathered, world=8, fsdp=True).weights == ddp.weights  # every block whole at once
    # gradient checkpointing keeps one tensor per layer instead of the whole layer's activations
    checkpointed = sharding.estimate(meta, _recipe(llama_70b, tmp_path, gradient_checkpointing=True), world=8,
                                     fsdp=True)  # fmt: skip
    assert checkpointed.activations < fsdp.activations / 10


def test_a_4bit_70b_llama_shards_its_packed_weights_after_loading_them_whole(llama_70b, tmp_path: Path) -> None:
    raw = tiny_recipe(llama_70b, "causal-lm", tmp_path / "out", training={"batch_size": 1, "distributed": "fsdp"})
    raw["model"].update(dtype="bfloat16", quantization="4bit")
    recipe = validate_mapping(raw)
    meta = build_meta_model(load_config(recipe.model), "causal-lm")
    fsdp = sharding.estimate(meta, recipe, world=8, fsdp=True)
    # by hand: 4 bits a block weight plus one float32 scale per 64 (0.5625 bytes); norms, embeddings, head in bf16
    block = 0.5625 * (2 * H * H + 2 * H * KV + 3 * H * FFN) + 2 * 2 * H
    whole = block * LAYERS + 2 * (2 * VOCAB * H + H)  # about 41 GB
    assert 38 * GB < whole < 44 * GB
    assert abs(fsdp.weights - (whole / 8 + 2 * block)) / fsdp.weights < 0.01
    assert abs(fsdp.cpu_load - whole) / whole < 0.01
    assert "before sharding, ~" in fsdp.line() and "of CPU memory per rank" in fsdp.line()
    assert "before sharding" not in sharding.estimate(meta, recipe, world=8, fsdp=False).line()


def test_preflight_says_when_ddp_does_not_fit_and_fsdp_would(llama_70b, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(distributed, "_device_bytes", lambda: 80 * 1024**3)  # an 80 GB GPU
    ddp = _recipe(llama_70b, tmp_path, gradient_checkpointing=True)
    line, warnings = distributed.memory_lines(ddp, trainable=1_000_000)
    assert line.startswith("memory per rank (a full copy on each of 8)")
    assert len(warnings) == 1 and "set training.distributed: fsdp" in warnings[0], warnings
    fsdp = _recipe(llama_70b, tmp_path, gradient_checkpointing=True, distributed="fsdp")
    line, warnings = distributed.memory_lines(fsdp, trainable=1_000_000)
    assert line.startswith("memory per rank (fsdp over 8 ranks)") and warnings == [], warnings
    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank holds all 141 GB whatever training.distributed says
    _, warnings = distributed.memory_lines(fsdp, trainable=1_000_000)
    assert len(warnings) == 1 and "will not fit" in warnings[0], warnings


def test_the_plan_shards_each_block(tiny_model) -> None:
    from transformers import AutoConfig

    for kind, task, blocks in [
        ("llama", "causal-lm", {"model.layers.*"}),
        ("t5", "seq2seq", {"encoder.block.*", "decoder.block.*"}),
    ]:
        meta = build_meta_model(AutoConfig.from_pretrained(tiny_model(kind, task)), task)
        assert sharding.shard_plan(meta) == dict.fromkeys(blocks, "free_full_weight")
        assert set(sharding.shard_plan(meta, "shard_grad_op").values()) == {"keep_full_weight"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cpu_offload_without_a_gpu_is_refused_naming_the_key(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from ia3cli.errors import RecipeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "out")
    raw["training"].update(distributed="fsdp", fsdp_cpu_offload=True)
    recipe = validate_mapping(raw)
    with pytest.raises(RecipeError, match="training.fsdp_cpu_offload: .*no GPU"):
        sharding.distributed_config(recipe, load_config(recipe.model))


def test_a_sharded_4bit_base_stores_its_packed_values_as_its_other_weights(tiny_model, tmp_path: Path, monkeypatch):
    from ia3cli.models.quantization import quantization_config

    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "out", training={"distributed": "fsdp"})
    raw["model"].update(quantization="4bit", dtype="bfloat16")
    recipe = validate_mapping(raw)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sharding.quant_storage(recipe) is None  # not launched: loaded whole, bitsandbytes' own uint8 storage
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1 shards too
    assert sharding.sharded_after_wrap(recipe) and sharding.quant_storage(recipe) == "bfloat16"
    assert quantization_config(recipe.model, "bfloat16").bnb_4bit_quant_storage == torch.bfloat16
    assert sharding.distributed_config(recipe, load_config(recipe.model)) is None  # not sharded while it loads
    raw["model"].update(dtype="auto", bnb_4bit_compute_dtype="float16")
    assert sharding.quant_storage(validate_mapping(raw)) == "float16"
