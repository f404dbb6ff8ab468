"""Shared fixtures: tiny random models saved to disk and loaded by path (the code path a hub id takes).

Each tiny model comes with a real word-level tokenizer built from the shipped sentiment data, so recipes run
end to end on them exactly as on a downloaded checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = ROOT / "recipes" / "data" / "sentiment"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def _vocab() -> list[str]:
    words: set[str] = set()
    for f in SENTIMENT.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            words.update(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    extra = "review sentiment positive negative question answer yes no user assistant the a is :"
    return SPECIALS + sorted(words | set(extra.split()))


def make_tokenizer(kind: str):
    """A word-level fast tokenizer; BERT-style kinds get [CLS] ... [SEP], decoders get <s> ..., T5 gets ... </s>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(_vocab()))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind in ("bert", "distilbert", "roberta"):
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(kind: str, vocab_size: int):
    """A tiny config of each family the tests cover."""
    import transformers as tf

    small = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "llama":
        return tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **small,
        )
    if kind == "bert":
        return tf.BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **small,
        )
    if kind == "distilbert":
        return tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=vocab_size, pad_token_id=0)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **small)
    if kind == "t5":
        return tf.T5Config(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            vocab_size=vocab_size,
            pad_token_id=0,
            eos_token_id=3,
        )
    raise ValueError(kind)


# The transformers auto class of each task, by name (importing transformers here would slow every test file).
AUTO_MODEL = {
    "seq-cls": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def auto_model(task: str):
    """The ``transformers`` auto class that builds a model for ``task`` (tests use it as an independent check)."""
    import transformers

    return getattr(transformers, AUTO_MODEL[task])


def save_tiny(kind: str, task: str, dest: Path) -> Path:
    """Save a tiny random model (seeded) of ``kind`` for ``task`` plus its tokenizer into ``dest``."""
    import torch

    torch.manual_seed(0)
    tok = make_tokenizer(kind)
    config = make_config(kind, len(tok))
    model = auto_model(task).from_config(config)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Derived files (dequantised GGUF) go to a per-session folder, so tests exercise the conversion too."""
    os.environ["IA3CLI_CACHE"] = str(tmp_path_factory.mktemp("ia3cli-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``tiny_model(kind, task)`` -> folder with a tiny random model and tokenizer (built once per session)."""
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, task: str = "causal-lm") -> Path:
        if (kind, task) not in made:
            made[(kind, task)] = save_tiny(kind, task, tmp_path_factory.mktemp(f"{kind}-{task}"))
        return made[(kind, task)]

    return get


def cli_env(*first_on_path: Path) -> dict[str, str]:
    """The environment of ia3cli started in a subprocess: offline, tokenizers quiet, ``first_on_path`` leading
    ``PYTHONPATH`` (a ``sitecustomize.py`` there slows or patches the run)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if first_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, first_on_path), os.environ.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_recipe(path: Path, recipe: dict) -> Path:
    """Dump a recipe mapping as YAML and return its path."""
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_recipe(model_dir: Path, task: str, out: Path, **sections: dict) -> dict:
    """A small recipe over the shipped sentiment data for a tiny model; ``sections`` update each section."""
    recipe: dict = {
        "model": {"name": str(model_dir), "task": task},
        "adapter": {},
        "data": {
            "path": str(SENTIMENT),
            "label_names": ["negative", "positive"],
            "train_samples": 32,
            "eval_samples": 16,
            "max_length": 32,
        },
        "training": {
            "output_dir": str(out),
            "max_steps": 4,
            "batch_size": 8,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 1,
            "learning_rate": 1e-2,
        },
        "monitor": {"every_steps": 2},
    }
    if task != "seq-cls":
        recipe["data"]["prompt_template"] = "Review: {text}\nSentiment:"
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def make_run(root: Path, model_dir: Path, task: str, *, quantization: str = "none", **sections: dict) -> Path:
    """A finished-looking run dir in ``root/run``: non-trivial IA3 vectors (and head), tokenizer, resolved recipe.yaml.

    The base is loaded by ``modeling.load_base`` as training does and wrapped by ``get_peft_model`` with PEFT's
    default IA3 targets for the family. The IA3 vectors are drawn from U(0.5, 1.5) and trained heads are perturbed:
    with identity vectors a test comparing adapter and base would prove nothing.
    """
    import torch
    from peft import IA3Config, get_peft_model, prepare_model_for_kbit_training
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TARGETS

    from ia3cli.config.load import dump_recipe, validate_mapping
    from ia3cli.models import loading as modeling

    run_dir = root / "run"
    raw = tiny_recipe(model_dir, task, run_dir, **sections)
    raw["model"]["quantization"] = quantization
    recipe = validate_mapping(raw)
    tokenizer = modeling.load_tokenizer(recipe.model)
    base = modeling.load_recipe_base(recipe, tokenizer)
    if quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    kind = base.config.model_type
    config = IA3Config(
        task_type=modeling.PEFT_TASK_TYPES[task],
        target_modules=IA3_TARGETS[kind],
        feedforward_modules=IA3_FEEDFORWARD[kind],
        fan_in_fan_out=kind == "gpt2",  # Conv1D stores (in, out)
    )
    model = get_peft_model(base, config)  # PEFT adds the seq-cls head (classifier/score) to modules_to_save
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.requires_grad:  # the seq-cls head (modules_to_save)
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(str(run_dir))
    tokenizer.save_pretrained(str(run_dir))
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    return run_dir


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for every Ray test of the run (starting one costs ~10 s)."""
    import ray

    # the cluster's worker processes import ia3cli from this checkout, as the test process does
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
