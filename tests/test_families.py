"""The family table against transformers itself: every family resolves on a tiny config of its model type, its task
list is what transformers has, its seq-cls head is what the model builds; the monitor's groups come from it; and
``ia3 inspect-modules`` without ``--task`` plans for the task the config says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config import families
from ia3cli.config.families import FAMILIES, TASK_NAMES, group_of, role_of
from ia3cli.config.recipe import ModelSection, Task
from ia3cli.models import loading as modeling
from ia3cli.models import targets

runner = CliRunner()


def _tiny_config(model_type: str) -> tf.PretrainedConfig:
    """A small config of ``model_type`` through the generic names transformers maps for every family."""
    family = FAMILIES[model_type]
    kwargs = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
    if family.intermediate_keys:
        kwargs[family.intermediate_keys[0]] = 64
    return tf.AutoConfig.for_model(model_type, **kwargs)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_resolves_on_a_tiny_config(model_type: str) -> None:
    family = FAMILIES[model_type]
    assert set(family.tasks) == set(modeling.tasks_for(model_type)), "tasks differ from transformers' auto classes"
    config = _tiny_config(model_type)
    for task in family.tasks[:1] + (("seq-cls",) if "seq-cls" in family.tasks[1:] else ()):
        model = modeling.build_meta_model(config, task)
        plan = targets.plan_for_model(model, config, task)
        assert plan.method == "family"
        roles = {r["role"] for r in plan.modules if r["targeted"]}
        assert roles & {"attn_k", "attn_v", "attn_qkv_fused"} and "ffn_down" in roles, roles
        assert plan.feedforward_names and set(plan.feedforward_names) <= set(plan.targeted_names)
        assert plan.intermediate_size == next(r["in_features"] for r in plan.modules if r["role"] == "ffn_down")
        assert set(plan.groups) == set(plan.targeted_names)
        assert {plan.groups[n] for n in plan.feedforward_names} == {"ff"}
        if task == "seq-cls":
            assert tuple(plan.head_modules) == family.seq_cls_head
            assert set(family.seq_cls_head) <= set(families.HEAD_MODULES)


def test_task_lists_are_one() -> None:
    import typing

    assert typing.get_args(Task) == TASK_NAMES == tuple(modeling.PEFT_TASK_TYPES)
    assert all(t in TASK_NAMES for f in FAMILIES.values() for t in f.tasks)


@pytest.mark.parametrize(
    ("model_type", "name", "is_feedforward", "group"),
    [
        ("llama", "base_model.model.model.layers.0.self_attn.k_proj", False, "k"),
        ("llama", "base_model.model.model.layers.0.self_attn.v_proj", False, "v"),
        ("llama", "base_model.model.model.layers.0.self_attn.q_proj", False, "q"),
        ("llama", "base_model.model.model.layers.0.mlp.down_proj", True, "ff"),
        ("llama", "base_model.model.model.layers.0.self_attn.o_proj", False, "other"),
        ("llama", "base_model.model.lm_head", False, "other"),
        ("bert", "bert.encoder.layer.1.attention.self.key", False, "k"),
        ("bert", "bert.encoder.layer.1.output.dense", True, "ff"),
        ("bert", "bert.encoder.layer.1.attention.output.dense", False, "other"),
        ("gpt2", "transformer.h.0.attn.c_attn", False, "qkv"),
        ("gpt2", "transformer.h.0.mlp.c_proj", True, "ff"),
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value", False, "qkv"),
        ("distilbert", "distilbert.transformer.layer.0.attention.k_lin", False, "k"),
        ("t5", "decoder.block.1.layer.1.EncDecAttention.v", False, "v"),
        ("mystery", "model.layers.0.attn.k_proj", False, "other"),  # unknown family: the plan decides
    ],
)
def test_groups_from_the_table(model_type: str, name: str, is_feedforward: bool, group: str) -> None:
    assert group_of(role_of(model_type, name), is_feedforward) == group


# ---------------------------------------------------------------------------------------------------------------
# inspect-modules without --task


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (lambda: tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=128), "seq2seq"),
        (
            lambda: tf.T5Config(
                d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, architectures=["T5ForConditionalGeneration"]
            ),
            "seq2seq",
        ),
        (lambda: tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128), "seq-cls"),
        (  # all-MiniLM-L6-v2's config: a bare BERT encoder
            lambda: tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  architectures=["BertModel"]),
            "seq-cls",
        ),
        (
            lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128, architectures=["LlamaForCausalLM"]),
            "causal-lm",
        ),
        (
            lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128, architectures=["LlamaForSequenceClassification"]),
            "seq-cls",
        ),
        (lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"]), "causal-lm"),
    ],
    ids=["t5", "t5-arch", "distilbert", "minilm-bert", "llama", "llama-cls", "gpt2"],
)  # fmt: skip
def test_inspect_modules_infers_the_task(tmp_path: Path, config, task: str) -> None:
    config().save_pretrained(tmp_path)
    result = runner.invoke(app, ["inspect-modules", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["task"] == task


def test_task_option_overrides_the_config(tmp_path: Path) -> None:
    tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4).save_pretrained(tmp_path)
    result = runner.invoke(app, ["inspect-modules", str(tmp_path), "--json", "--task", "seq-cls"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["task"] == "seq-cls" and plan["head_modules"] == ["classification_head"]
    wrong = runner.invoke(app, ["inspect-modules", str(tmp_path), "--task", "causal-lm"])
    assert wrong.exit_code == 2 and "'t5' supports: seq-cls, seq2seq" in wrong.output


def test_recommend_without_task_uses_the_same_rule(tmp_path: Path) -> None:
    tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128).save_pretrained(tmp_path)
    assert targets.recommend(ModelSection(name=str(tmp_path))).task == "seq-cls"


def test_families_import_nothing_heavy() -> None:
    code = (
        "import sys, ia3cli.config.families; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
