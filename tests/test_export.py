"""`ia3 export` on tiny random Llama and Qwen2 models: the GGUF file reproduces the merged model for each type.

Each tiny model gets a real byte-level BPE tokenizer (trained here on the shipped sentiment data), because GGUF
stores only BPE/sentencepiece vocabularies. The GGUF bases are written by the export's own Hugging Face writer
(q8_0); runs on them and on the Hugging Face folders come from `tests.conftest.make_run` (random IA3 vectors in
U(0.5, 1.5)). Every export is checked independently of the export's own proof: the file is reloaded with
transformers' GGUF loader and its logits compared with the PEFT adapter model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.errors import Ia3Error, RunError
from ia3cli.inference import export as exporting
from ia3cli.inference import gguf_write
from ia3cli.inference.export import RTOL, export
from tests.conftest import SENTIMENT, make_run

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 400 tokens, ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for f in sorted(SENTIMENT.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], unk_token=SPECIALS[0], pad_token=SPECIALS[0]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(kind: str, vocab_size: int) -> tf.PretrainedConfig:
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[kind]
    return cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """(kind, "hf" | "gguf") -> the recipe's model section for a tiny base of that kind."""
    made = {}
    tok = bpe_tokenizer()
    for kind in ("llama", "qwen2"):
        torch.manual_seed(0)
        config = tiny_config(kind, len(tok))
        model = tf.AutoModelForCausalLM.from_config(config)
        hf_dir = tmp_path_factory.mktemp(f"{kind}-hf")
        model.save_pretrained(hf_dir)
        tok.save_pretrained(hf_dir)
        gguf_dir = tmp_path_factory.mktemp(f"{kind}-gguf")
        state = {k: v.float().numpy() for k, v in model.state_dict().items()}
        gguf_write.write_hf(gguf_dir / "base.gguf", state, config, hf_dir, "q8_0", f"tiny-{kind}")
        made[(kind, "hf")] = {"name": str(hf_dir)}
        made[(kind, "gguf")] = {"name": str(gguf_dir), "gguf_file": "base.gguf"}
    return made


@pytest.fixture(scope="module")
def runs(bases: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(kind, source) -> a finished-looking IA3 run dir on that base."""
    made = {}
    for (kind, source), model in bases.items():
        hf_dir = Path(bases[(kind, "hf")]["name"])
        root = tmp_path_factory.mktemp(f"run-{kind}-{source}")
        made[(kind, source)] = make_run(root, hf_dir, "causal-lm", model=model)
    return made


def adapter_logits(run_dir: Path, full_precision: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PEFT adapter model's logits on three sentences (not the export's probe rows); ``full_precision``: on the
    float32 base even for a 4-bit run."""
    from ia3cli.config.load import load_recipe
    from ia3cli.tuners.ia3 import load_run_model

    recipe = load_recipe(run_dir / "recipe.yaml")
    if full_precision:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})
    model, tokenizer = load_run_model(run_dir, recipe)
    texts = ["Review: a warm, clever comedy.\nSentiment:", "Review: sadly full of ads.\nSentiment:", "Pretty good"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return model.eval()(**batch).logits.float(), batch


def gguf_logits(path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


CASES = [
    *[pytest.param("llama", "gguf", t, id=f"llama-gguf-{t}") for t in ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0")],
    pytest.param("qwen2", "gguf", "f16", id="qwen2-gguf-f16"),
    pytest.param("qwen2", "gguf", "q4_0", id="qwen2-gguf-q4_0"),
    pytest.param("qwen2", "gguf", None, id="qwen2-gguf-default"),
    pytest.param("llama", "hf", "q8_0", id="llama-hf-q8_0"),
    pytest.param("qwen2", "hf", "bf16", id="qwen2-hf-bf16"),
]


@pytest.mark.parametrize(("kind", "source", "type_name"), CASES)
def test_export_reproduces_the_merged_model(runs: dict, tmp_path: Path, kind: str, source: str, type_name: str) -> None:
    run_dir = runs[(kind, source)]
    out = tmp_path / "model.gguf"

    report = export(run_dir, out, type_name=type_name)

    assert report["tolerance_type"] in RTOL and report["max_abs_diff"] <= report["tolerance"]
    assert report["source_kind"] == {"hf": "huggingface", "gguf": "gguf"}[source] and report["probe_rows"] == 8
    expected_type = (type_name or "q8_0").upper()  # the default keeps the q8_0 source's type
    # 1-D tensors (norms, biases) stay f32 in a Hugging Face export; a GGUF source keeps its own for the rest
    assert set(report["tensor_types"]) <= {expected_type, "F32"} and expected_type in report["tensor_types"]
    assert json.loads((tmp_path / "model.export.json").read_text()) == report
    assert (tmp_path / "model.Modelfile").read_text().startswith("FROM ./model.gguf\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.export.json", "model.gguf"]

    # Independently of the export's probe: other sentences, the PEFT adapter model as reference.
    expected, batch = adapter_logits(run_dir)
    if source == "hf":  # the vocabulary was written by the export: it must tokenize as the run's tokenizer does
        from_file = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
        text = "Review: a warm, clever comedy!\nSentiment: positive<|im_end|>"
        assert from_file(text)["input_ids"] == tf.AutoTokenizer.from_pretrained(str(run_dir))(text)["input_ids"]
        assert "<|im_start|>assistant" in from_file.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    got = gguf_logits(out, batch)
    real = batch["attention_mask"].bool()
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs()[real].max()) <= RTOL[report["tolerance_type"]] * scale
    agree = float((got.argmax(-1) == expected.argmax(-1))[real].float().mean())
    # random tiny models have near-tied logits, so rounding may flip a few arg-max tokens
    assert agree == 1.0 if type_name == "f32" else agree >= {"f16": 0.95, "bf16": 0.9, "q8_0": 0.9}.get(type_name, 0.5)


def test_a_run_trained_in_4bit_exports_from_the_full_precision_base(bases: dict, tmp_path: Path) -> None:
    hf_dir = Path(bases[("llama", "hf")]["name"])
    run_dir = make_run(tmp_path, hf_dir, "causal-lm", quantization="4bit")
    report = export(run_dir, tmp_path / "m.gguf", type_name="f16")
    assert report["trained_quantization"] == "4bit" and report["max_abs_diff"] <= report["tolerance"]
    expected, batch = adapter_logits(run_dir, full_precision=True)
    assert float((gguf_logits(tmp_path / "m.gguf", batch) - expected).abs().max()) <= RTOL["f16"]


def test_gguf_source_keeps_every_other_tensor_and_the_metadata(bases: dict, runs: dict, tmp_path: Path) -> None:
    from gguf import GGUFReader

    export(runs[("llama", "gguf")], tmp_path / "m.gguf", type_name="f16")
    source = GGUFReader(str(Path(bases[("llama", "gguf")]["name"]) / "base.gguf"))
    exported = GGUFReader(str(tmp_path / "m.gguf"))
    new = {t.name: t for t in exported.tensors}
    changed = sorted(t.name for t in source.tensors if new[t.name].data.tobytes() != t.data.tobytes())
    assert [t.name for t in exported.tensors] == [t.name for t in source.tensors]
    assert changed == [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_k", "attn_v", "ffn_down")]
    assert {new[n].tensor_type.name for n in changed} == {"F16"}
    assert {k: f.contents() for k, f in exported.fields.items() if not k.startswith("GGUF.")} == {
        k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")
    }


WRONG_FOLDS = [
    pytest.param("gguf", "vectors", id="gguf-vectors-ignored"),
    pytest.param("gguf", "rope", id="gguf-k-not-permuted"),
    pytest.param("hf", "rope", id="hf-q-k-not-permuted"),
]


@pytest.mark.parametrize(("source", "mistake"), WRONG_FOLDS)
def test_a_wrong_fold_fails_the_proof(runs: dict, tmp_path: Path, monkeypatch, source: str, mistake: str) -> None:
    if mistake == "vectors":  # copy the source's tensors untouched, as if the vectors were not there
        monkeypatch.setattr(exporting, "adapted_parameters", lambda vectors, tensors: {})
    else:  # keep the Hugging Face row order for Q and K
        monkeypatch.setattr(gguf_write, "to_file_order", lambda name, array, arch, config: array)
    out = tmp_path / "wrong.gguf"

    with pytest.raises(RunError, match="export check failed"):
        export(runs[("llama", source)], out, type_name="f16")
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind"


def test_rotary_row_order_is_llama_cpps() -> None:
    """`llama` files interleave the two rotary halves of each Q/K head (K with its own head count); qwen2 does not."""
    import numpy as np

    config = tiny_config("llama", 400)  # 4 query heads, 2 key/value heads, head_dim 16
    k_rows = np.arange(32)
    first_head = [v for pair in zip(range(8), range(8, 16), strict=True) for v in pair]
    expected = first_head + [16 + v for v in first_head]
    assert gguf_write.to_file_order("blk.0.attn_k.weight", k_rows, "llama", config).tolist() == expected
    q_rows = np.arange(64).reshape(64, 1).repeat(3, axis=1)
    assert gguf_write.to_file_order("blk.1.attn_q.weight", q_rows, "llama", config)[:16, 0].tolist() == first_head
    for name, arch in [("blk.0.attn_k.weight", "qwen2"), ("blk.0.attn_v.weight", "llama")]:
        assert gguf_write.to_file_order(name, k_rows, arch, config).tolist() == list(range(32))


def test_cli_export_replaces_only_its_own_output(runs: dict, tmp_path: Path) -> None:
    run_dir, out = runs[("llama", "gguf")], tmp_path / "qs.gguf"
    runner = CliRunner()

    first = runner.invoke(app, ["export", str(run_dir), str(out), "--type", "q8_0"])
    assert first.exit_code == 0, first.output
    assert "exported to" in first.output and "ollama create NAME -f" in first.output
    modelfile = (tmp_path / "qs.Modelfile").read_text()
    assert "{{ .Prompt }}" in modelfile and "{{ if .System }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile

    again = runner.invoke(app, ["export", str(run_dir), str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["export", str(run_dir), str(out), "--type", "f16", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "qs.export.json").read_text())["type"] == "f16"


def test_existing_files_ia3cli_did_not_write_are_refused(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"not ours")
    with pytest.raises(Ia3Error, match="did not write"):
        export(runs[("llama", "gguf")], out, force=True)
    assert out.read_bytes() == b"not ours"
    (tmp_path / "other.Modelfile").write_text("FROM llama3\n")
    with pytest.raises(Ia3Error, match="did not write"):
        export(runs[("llama", "gguf")], tmp_path / "other.gguf")


@pytest.mark.parametrize(
    ("kind", "task", "match"),
    [
        pytest.param("gpt2", "causal-lm", "supported families are llama, mistral, qwen2", id="gpt2"),
        pytest.param("bert", "seq-cls", "seq-cls run cannot be exported", id="bert-seq-cls"),
    ],
)
def test_unsupported_runs_exit_2(tiny_model, tmp_path: Path, kind: str, task: str, match: str) -> None:
    run_dir = make_run(tmp_path, tiny_model(kind, task), task)
    result = CliRunner().invoke(app, ["export", str(run_dir), str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and match in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.gguf").exists()


def test_bad_arguments_exit_2(runs: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    bad_type = runner.invoke(app, ["export", str(runs[("llama", "gguf")]), str(tmp_path / "x.gguf"), "--type", "q2_k"])
    assert bad_type.exit_code == 2 and "--type: 'q2_k' is not supported" in bad_type.output
    suffix = runner.invoke(app, ["export", str(runs[("llama", "gguf")]), str(tmp_path / "x.bin")])
    assert suffix.exit_code == 2 and "must end in .gguf" in suffix.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "x.gguf")])
    assert missing.exit_code == 2 and "run directory not found" in missing.output
    assert list(tmp_path.iterdir()) == []


SMOL_TEMPLATE = (  # SmolLM2's shape: a default system prompt when the conversation has none
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_modelfile_turns_the_chat_template_into_an_ollama_template() -> None:
    from ia3cli.inference.ollama import modelfile

    tok = bpe_tokenizer()
    optional_system = modelfile("m.gguf", tok)
    assert optional_system == (
        "FROM ./m.gguf\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
        '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
    )
    tok.chat_template = SMOL_TEMPLATE
    default_system = modelfile("m.gguf", tok)
    assert 'TEMPLATE """<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ .Prompt }}' in default_system
    assert 'SYSTEM """You are a helpful assistant."""' in default_system
    tok.chat_template = None
    assert modelfile("m.gguf", tok) == 'FROM ./m.gguf\nPARAMETER stop "<|im_end|>"\n'


def test_default_type_keeps_the_source_type_unless_4bit_columns_were_scaled() -> None:
    from ia3cli.inference.export import default_type

    assert default_type("Q4_1", columns_scaled=False) == "q4_1"  # rows: each block stays on its grid
    assert default_type("Q4_1", columns_scaled=True) == "q8_0"
    assert default_type("F16", columns_scaled=True) == "f16"
    assert default_type("Q6_K", columns_scaled=False) == "q8_0"  # the gguf package cannot quantise K-quants
