"""The IA3 target resolver: tiny configs per family, saved to a temp dir and loaded by the hub-id code path.

One table (FAMILIES) drives most tests: the recommended targets and feed-forward modules per family, the exact IA3
vector count, and a real (random-weight) model wrapped by PEFT with the plan, which must wrap exactly the planned
modules and create exactly ``plan.ia3_params`` entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from peft import IA3Config, get_peft_model
from peft.tuners.ia3 import IA3Layer

from ia3cli.config.recipe import AdapterSection, ModelSection
from ia3cli.errors import RecipeError
from ia3cli.models import loading as modeling
from ia3cli.models import render, targets
from tests.conftest import auto_model

TINY = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2, **TINY}


def _t5(**kw: Any) -> tf.T5Config:
    return tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128, **kw)


# (id, config factory, task, target_modules, feedforward_modules, ia3_params)
# ia3_params by hand: non-ff targets count out_features, ff targets in_features; 2 layers each.
FAMILIES = [
    ("llama", lambda: tf.LlamaConfig(**DECODER), "causal-lm", ["k_proj", "v_proj", "down_proj"], ["down_proj"],
     2 * (16 + 16 + 64)),
    ("mistral", lambda: tf.MistralConfig(**DECODER), "causal-lm", ["k_proj", "v_proj", "down_proj"], ["down_proj"],
     2 * (16 + 16 + 64)),
    ("qwen2", lambda: tf.Qwen2Config(**DECODER), "causal-lm", ["k_proj", "v_proj", "down_proj"], ["down_proj"],
     2 * (16 + 16 + 64)),
    ("qwen3", lambda: tf.Qwen3Config(head_dim=8, **DECODER), "causal-lm", ["k_proj", "v_proj", "down_proj"],
     ["down_proj"], 2 * (16 + 16 + 64)),
    ("gemma", lambda: tf.GemmaConfig(head_dim=8, **DECODER), "causal-lm", ["k_proj", "v_proj", "down_proj"],
     ["down_proj"], 2 * (16 + 16 + 64)),
    ("phi", lambda: tf.PhiConfig(hidden_size=32, intermediate_size=64, **TINY), "causal-lm",
     ["k_proj", "v_proj", "fc2"], ["fc2"], 2 * (32 + 32 + 64)),
    # encoder: k, v, wo per layer; decoder: self k, v + cross k, v + wo
    ("t5", _t5, "seq2seq", ["k", "v", "wo"], ["wo"], 2 * (32 + 32 + 64) + 2 * (4 * 32 + 64)),
    ("flan-t5", lambda: _t5(feed_forward_proj="gated-gelu"), "seq2seq", ["k", "v", "wo"], ["wo"],
     2 * (32 + 32 + 64) + 2 * (4 * 32 + 64)),
    ("bart", lambda: tf.BartConfig(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2,
                                   decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                   vocab_size=128), "seq2seq",
     ["k_proj", "v_proj", "fc2"], ["fc2"], 2 * (32 + 32 + 64) + 2 * (4 * 32 + 64)),
    ("bert", lambda: tf.BertConfig(hidden_size=32, intermediate_size=64, **TINY), "seq-cls",
     r".*\.(?:key|value|\d+\.output\.dense)", r".*\.\d+\.output\.dense", 2 * (32 + 32 + 64)),
    ("roberta", lambda: tf.RobertaConfig(hidden_size=32, intermediate_size=64, **TINY), "seq-cls",
     r".*\.(?:key|value|\d+\.output\.dense)", r".*\.\d+\.output\.dense", 2 * (32 + 32 + 64)),
    ("distilbert", lambda: tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128),
     "seq-cls", ["k_lin", "v_lin", "lin2"], ["lin2"], 2 * (32 + 32 + 64)),
    ("opt", lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **TINY), "causal-lm",
     ["k_proj", "v_proj", "fc2"], ["fc2"], 2 * (32 + 32 + 64)),
    # c_attn is fused QKV (out 3*32); mlp.c_proj is the down-projection (in n_inner=64), attn.c_proj is not
    ("gpt2", lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128), "causal-lm",
     ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], 2 * (96 + 64)),
    ("gpt_neox", lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **TINY), "causal-lm",
     ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"], 2 * (96 + 64)),
    # multi-query: Q (32) + one K and one V head (8 each); ffn_hidden_size defaults to 4*32
    ("falcon", lambda: tf.FalconConfig(hidden_size=32, **TINY), "causal-lm",
     ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"], 2 * (48 + 128)),
]  # fmt: skip
IDS = [f[0] for f in FAMILIES]
BY_ID = {f[0]: f for f in FAMILIES}
PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _saved(tmp_path: Path, family: str) -> ModelSection:
    """Save the family's tiny config to a folder and name it like a hub id would be."""
    config = BY_ID[family][1]()
    folder = tmp_path / family
    config.save_pretrained(folder)
    return ModelSection(name=str(folder), task=BY_ID[family][2])


def _real_model(family: str) -> torch.nn.Module:
    config, task = BY_ID[family][1](), BY_ID[family][2]
    torch.manual_seed(0)
    return auto_model(task).from_config(config)


def _wrap(model: torch.nn.Module, plan: targets.TargetPlan, task: str) -> Any:
    config = IA3Config(
        task_type=PEFT_TASK[task],
        target_modules=plan.target_modules,
        feedforward_modules=plan.feedforward_modules,
        fan_in_fan_out=plan.fan_in_fan_out,
        modules_to_save=plan.modules_to_save,  # what ia3.ia3_config passes
    )
    return get_peft_model(model, config)


def _wrapped(peft_model: Any) -> tuple[set[str], set[str], int]:
    """Names PEFT wrapped (without its prefix), those it treats as feed-forward, and the IA3 entries created."""
    prefix = "base_model.model."
    wrapped = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, IA3Layer)}
    ff = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, IA3Layer) and m.is_feedforward}
    entries = sum(p.numel() for n, p in peft_model.named_parameters() if ".ia3_l." in n)
    return wrapped, ff, entries


# ---------------------------------------------------------------------------------------------------------------
# the family table


@pytest.mark.parametrize("family", IDS)
def test_recommend_per_family(tmp_path: Path, family: str) -> None:
    _, _, task, want_targets, want_ff, want_params = BY_ID[family]
    plan = targets.recommend(_saved(tmp_path, family), task)
    assert plan.method == "family"
    assert plan.target_modules == want_targets
    assert plan.feedforward_modules == want_ff
    assert plan.ia3_params == want_params
    assert set(plan.feedforward_names) <= set(plan.targeted_names)
    assert all(r["role"] == "ffn_down" for r in plan.modules if r["feedforward"])
    assert not any(r["targeted"] for r in plan.modules if r["role"] == "head")


@pytest.mark.parametrize("family", IDS)
def test_peft_wraps_exactly_the_plan(family: str) -> None:
    """The plan's spec, given to PEFT on a random-weight model, wraps exactly the planned modules."""
    task = BY_ID[family][2]
    model = _real_model(family)
    plan = targets.plan_for_model(model, model.config, task)
    wrapped, ff, entries = _wrapped(_wrap(model, plan, task))
    assert wrapped == set(plan.targeted_names)
    assert ff == set(plan.feedforward_names)
    assert entries == plan.ia3_params == BY_ID[family][5]


def test_bert_regex_selects_ffn_output_not_attention_output() -> None:
    model = _real_model("bert")
    plan = targets.plan_for_model(model, model.config, "seq-cls")
    assert isinstance(plan.target_modules, str)
    assert "bert.encoder.layer.1.output.dense" in plan.feedforward_names
    assert not any("attention.output" in n for n in plan.targeted_names)
    assert len(plan.targeted_names) == 6


def test_gpt2_conv1d_shapes_and_roles() -> None:
    model = _real_model("gpt2")
    plan = targets.plan_for_model(model, model.config, "causal-lm")
    rows = {r["pattern"]: r for r in plan.modules}
    fused = rows["transformer.h.*.attn.c_attn"]
    assert (fused["kind"], fused["in_features"], fused["out_features"], fused["role"]) == (
        "Conv1D",
        32,
        96,
        "attn_qkv_fused",
    )
    assert (
        rows["transformer.h.*.attn.c_proj"]["role"] == "attn_o" and not rows["transformer.h.*.attn.c_proj"]["targeted"]
    )
    down = rows["transformer.h.*.mlp.c_proj"]
    assert (down["kind"], down["in_features"], down["role"], down["feedforward"]) == ("Conv1D", 64, "ffn_down", True)
    assert rows["lm_head"]["role"] == "head"
    assert plan.fan_in_fan_out


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon"])
def test_fused_qkv_warns_that_queries_are_scaled(tmp_path: Path, family: str) -> None:
    plan = targets.recommend(_saved(tmp_path, family), BY_ID[family][2])
    assert any("fused" in w and "queries" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("qwen2", "queries instead of keys"),
        ("qwen3", "queries instead of keys"),
        ("gemma", "queries instead of keys"),
        ("phi", "queries instead of keys"),
        ("bart", "queries instead of keys"),
        ("opt", "does not scale self_attn.v_proj"),
        ("bert", "treats attention.output.dense as feed-forward"),
        ("distilbert", "no IA3 default"),
        ("llama", "Same modules as PEFT's default"),
    ],
)
def test_notes_compare_with_peft_default(tmp_path: Path, family: str, expected: str) -> None:
    plan = targets.recommend(_saved(tmp_path, family), BY_ID[family][2])
    assert any(expected in n for n in plan.notes), plan.notes
    assert (plan.peft_default is None) == (family == "distilbert")


def test_seq_cls_head_is_reported_for_modules_to_save(tmp_path: Path) -> None:
    plan = targets.recommend(_saved(tmp_path, "distilbert"), "seq-cls")
    assert plan.head_modules == ["pre_classifier", "classifier"]
    assert {r["pattern"] for r in plan.modules if r["role"] == "head"} == {"pre_classifier", "classifier"}


# ---------------------------------------------------------------------------------------------------------------
# unknown families: shape analysis


@pytest.mark.parametrize("family", IDS)
def test_shape_analysis_matches_family_table(family: str) -> None:
    task = BY_ID[family][2]
    with torch.device("meta"):
        model = _real_model(family)
    by_table = targets.plan_for_model(model, model.config, task)
    by_shape = targets.plan_for_model(model, model.config, task, use_family_table=False)
    assert by_shape.method == "shape-analysis"
    assert any("shape analysis" in n for n in by_shape.notes)
    assert by_shape.targeted_names == by_table.targeted_names
    assert by_shape.feedforward_names == by_table.feedforward_names
    assert by_shape.ia3_params == by_table.ia3_params
    assert [r["role"] for r in by_shape.modules] == [r["role"] for r in by_table.modules]


# ---------------------------------------------------------------------------------------------------------------
# explicit targets


def _resolve(tmp_path: Path, family: str, **adapter: Any) -> targets.TargetPlan:
    model = _saved(tmp_path, family)
    return targets.resolve(model, AdapterSection(**adapter), model.task)


def test_unmatched_entry_names_it_with_close_names(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _resolve(tmp_path, "llama", target_modules=["k_proj", "v_prj", "down_proj"])
    assert err.value.key == "adapter.target_modules"
    assert "'v_prj' matches no module" in err.value.message
    assert "v_proj" in err.value.hint and "inspect-modules" in err.value.hint


def test_bare_string_is_a_regex_on_full_names(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _resolve(tmp_path, "llama", target_modules="k_proj")
    assert "'k_proj' matches no module" in err.value.message
    assert "write a list" in err.value.hint


def test_entry_matching_a_non_linear_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a linear layer"):
        _resolve(tmp_path, "llama", target_modules=["k_proj", "mlp"])


def test_invalid_regex(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a valid regex"):
        _resolve(tmp_path, "llama", target_modules=r".*\.(k_proj")


def test_feedforward_not_in_target_list(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _resolve(tmp_path, "llama", target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    assert err.value.key == "adapter.feedforward_modules"
    assert "'down_proj'" in err.value.message


def test_feedforward_regex_selecting_non_targets(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _resolve(tmp_path, "llama", target_modules=["k_proj", "v_proj"], feedforward_modules=r".*\.up_proj")
    assert err.value.key == "adapter.feedforward_modules"
    assert "subset" in err.value.message


def test_distilbert_lin1_as_feedforward_warns_about_lin2(tmp_path: Path) -> None:
    plan = _resolve(tmp_path, "distilbert", target_modules=["k_lin", "v_lin", "lin1"], feedforward_modules=["lin1"])
    assert plan.method == "explicit"
    warning = next(w for w in plan.warnings if "lin1" in w)
    assert "intermediate size 64" in warning and "ffn.lin2" in warning
    assert plan.ia3_params == 2 * (32 + 32 + 32)  # lin1 in_features is the hidden size


def test_down_projection_not_marked_feedforward_warns(tmp_path: Path) -> None:
    plan = _resolve(tmp_path, "llama", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[])
    assert any("down_proj" in w and "feedforward_modules" in w for w in plan.warnings)
    assert plan.ia3_params == 2 * (16 + 16 + 32)


def test_queries_instead_of_keys_gets_a_note(tmp_path: Path) -> None:
    plan = _resolve(tmp_path, "qwen2", target_modules=["q_proj", "v_proj", "down_proj"])
    assert any("queries" in n and "k_proj" in n for n in plan.notes)


def test_explicit_targets_with_auto_feedforward(tmp_path: Path) -> None:
    """Mixed: explicit targets, feed-forward auto -> the recommended ff modules among the targets."""
    plan = _resolve(tmp_path, "bert", target_modules=["key", "value", "output.dense"])
    assert plan.target_modules == ["key", "value", "output.dense"]
    # 'output.dense' as a ff list entry would also catch attention.output.dense (PEFT's plain suffix rule)
    assert plan.feedforward_modules == r".*\.\d+\.output\.dense"
    assert len(plan.targeted_names) == 8 and len(plan.feedforward_names) == 2
    model = _real_model("bert")
    wrapped, ff, entries = _wrapped(_wrap(model, plan, "seq-cls"))
    assert (wrapped, ff, entries) == (set(plan.targeted_names), set(plan.feedforward_names), plan.ia3_params)


def test_auto_targets_with_explicit_feedforward(tmp_path: Path) -> None:
    plan = _resolve(tmp_path, "opt", feedforward_modules=["fc2"])
    assert plan.target_modules == ["k_proj", "v_proj", "fc2"]
    assert plan.feedforward_modules == ["fc2"] and plan.method == "explicit"


def test_explicit_regex_and_all_linear(tmp_path: Path) -> None:
    plan = _resolve(tmp_path, "gpt2", target_modules=r".*\.h\.0\.attn\.c_attn")
    assert plan.targeted_names == ["transformer.h.0.attn.c_attn"] and plan.ia3_params == 96
    assert plan.feedforward_modules == []
    everything = _resolve(tmp_path, "llama", target_modules="all-linear")
    assert len(everything.targeted_names) == 14  # 7 linears x 2 layers, lm_head excluded
    assert len(everything.feedforward_names) == 2


@pytest.mark.parametrize("family", ["llama", "bert", "distilbert", "t5", "gpt2", "bart"])
def test_all_linear_is_every_linear_inside_the_blocks(tmp_path: Path, family: str) -> None:
    plan = _resolve(tmp_path, family, target_modules="all-linear")
    rows = plan.modules
    inside = sum(r["count"] for r in rows if ".*." in r["pattern"] and r["role"] != "head" and r["kind"] != "Embedding")
    assert len(plan.targeted_names) == inside
    assert all(r["targeted_count"] == r["count"] for r in rows if ".*." in r["pattern"] and r["role"] != "head")
    assert not any(r["targeted"] for r in rows if r["role"] == "head" or ".*." not in r["pattern"])
    assert {r["role"] for r in rows if r["feedforward"]} == {"ffn_down"}
    assert all(r["feedforward"] for r in rows if r["role"] == "ffn_down")
    model = _real_model(family)
    wrapped, ff, entries = _wrapped(_wrap(model, plan, BY_ID[family][2]))
    assert (wrapped, ff, entries) == (set(plan.targeted_names), set(plan.feedforward_names), plan.ia3_params)


def test_all_linear_is_not_a_feedforward_value(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _resolve(tmp_path, "llama", target_modules="all-linear", feedforward_modules="all-linear")
    assert err.value.key == "adapter.feedforward_modules"


def test_targets_exclude_exactly_the_modules_peft_saves(tmp_path: Path) -> None:
    """BART's seq-cls head has its own out_proj: PEFT receives classification_head in modules_to_save and never
    wraps it, so the plan must not count it either."""
    folder = tmp_path / "bart-cls"
    BY_ID["bart"][1]().save_pretrained(folder)
    plan = targets.resolve(
        ModelSection(name=str(folder), task="seq-cls"),
        AdapterSection(target_modules=["k_proj", "v_proj", "out_proj", "fc2"]),
        "seq-cls",
    )
    assert plan.modules_to_save == ["classification_head"]
    assert not any(n.startswith("classification_head") for n in plan.targeted_names)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(BY_ID["bart"][1]())
    wrapped, ff, entries = _wrapped(_wrap(model, plan, "seq-cls"))
    assert (wrapped, ff, entries) == (set(plan.targeted_names), set(plan.feedforward_names), plan.ia3_params)


def test_entry_naming_only_a_saved_head_module_matches_nothing(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="'pre_classifier' matches no module"):
        _resolve(tmp_path, "distilbert", target_modules=["k_lin", "v_lin", "lin2", "pre_classifier"])


# ---------------------------------------------------------------------------------------------------------------
# config loading and the meta model


def test_load_config_from_folder(tmp_path: Path) -> None:
    config = modeling.load_config(_saved(tmp_path, "llama"))
    assert config.model_type == "llama" and config.hidden_size == 32


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/no/such/folder", "directory not found"),
        ("nobody/does-not-exist", "offline and not in the local cache"),
        ("pkg:no_such_package_xyz", "not installed"),
    ],
)
def test_load_config_errors_name_model_name(name: str, expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        modeling.load_config(ModelSection(name=name))
    assert err.value.key == "model.name"
    assert expected in err.value.message


def test_load_config_folder_problems(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="has no config.json"):
        modeling.load_config(ModelSection(name=str(tmp_path)))
    with pytest.raises(RecipeError) as err:
        modeling.load_config(ModelSection(name=str(tmp_path), gguf_file="model.gguf"))
    assert err.value.key == "model.gguf_file"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "c.MyConfig"}}))
    with pytest.raises(RecipeError) as err:
        modeling.load_config(ModelSection(name=str(custom)))
    assert err.value.key == "model.name" and "trust_remote_code" in str(err.value)


def test_meta_model_has_no_weights_and_task_must_exist(tmp_path: Path) -> None:
    config = modeling.load_config(_saved(tmp_path, "distilbert"))
    model = modeling.build_meta_model(config, "seq-cls", num_labels=5)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.classifier.out_features == 5
    with pytest.raises(RecipeError) as err:
        modeling.build_meta_model(config, "causal-lm")
    assert err.value.key == "model.task" and "seq-cls" in err.value.hint


def test_70b_config_answers_in_seconds(tmp_path: Path) -> None:
    config = tf.LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    config.save_pretrained(tmp_path)
    start = time.perf_counter()
    plan = targets.recommend(ModelSection(name=str(tmp_path)), "causal-lm")
    assert time.perf_counter() - start < 30
    assert plan.ia3_params == 80 * (1024 + 1024 + 28672)
    assert plan.lora_r8_params == 80 * 8 * ((8192 + 1024) * 2 + 28672 + 8192)
    assert plan.adapter_bytes_fp32 > 4 * plan.ia3_params > plan.adapter_bytes_fp16


@pytest.mark.parametrize(("family", "task"), [("t5", "seq2seq"), ("bert", "seq-cls"), ("llama", "causal-lm")])
def test_recommend_picks_a_task(tmp_path: Path, family: str, task: str) -> None:
    assert targets.recommend(ModelSection(name=str(_saved(tmp_path, family).name))).task == task


# ---------------------------------------------------------------------------------------------------------------
# sizes and output


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_adapter_bytes_match_the_saved_file(tmp_path: Path, family: str) -> None:
    task = BY_ID[family][2]
    model = _real_model(family)
    plan = targets.plan_for_model(model, model.config, task)
    _wrap(model, plan, task).save_pretrained(tmp_path)
    assert plan.adapter_bytes_fp32 == (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 2 * plan.ia3_params < plan.adapter_bytes_fp16 < plan.adapter_bytes_fp32 - 2 * plan.ia3_params + 64


def test_render_and_json(tmp_path: Path) -> None:
    plan = targets.recommend(_saved(tmp_path, "bert"), "seq-cls")
    text = render.render_plan(plan)
    assert "bert.encoder.layer.*.output.dense" in text and "ffn_down" in text
    assert "PEFT default" in text and "IA3 parameters:      256" in text and "LoRA r=8" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    data = json.loads(json.dumps(plan.to_json()))
    for key in ("model_type", "target_modules", "feedforward_modules", "ia3_params", "lora_r8_params",
                "adapter_bytes_fp32", "adapter_bytes_fp16", "warnings", "notes", "method", "peft_default",
                "modules"):  # fmt: skip
        assert key in data
    row = next(r for r in data["modules"] if r["pattern"] == "bert.encoder.layer.*.output.dense")
    assert row == row | {"count": 2, "in_features": 64, "out_features": 32, "targeted": True, "feedforward": True}


def test_importing_targets_does_not_import_torch() -> None:
    code = (
        "import sys, ia3cli.models.targets, ia3cli.models.render, ia3cli.config.families, ia3cli.models.matching; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
