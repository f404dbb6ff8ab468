"""GPU figures: training tokens/s and peak memory, and serving requests/s with 256 adapters. Needs CUDA.

Model: a Llama-3.2-1B-shaped model (16 layers, hidden 2048, FFN 8192, 32 heads / 8 KV heads, 128,256-token
vocabulary, tied embeddings) with random weights, built from its config and saved once under bench/_work (bf16
safetensors), so nothing is downloaded. Its tokenizer is a byte-level BPE trained here on the shipped sentiment
texts (ids stay below 8,000; the model's vocabulary size is the real one).

Training (causal-lm, rows of 1-40 joined sentiment reviews, 30..500 tokens, verbaliser targets; batch 8, STEPS
steps, learning rate 3e-3, no evaluation or checkpoints) in fp32, bf16 and 4-bit NF4 (bf16 compute), each:

- seed: the script users copy today (PEFT + a plain Trainer, as bench/throughput.py on CPU): every row padded to
  max_length 512, PEFT's default IA3 targets, the same precision flags;
- ia3cli: ``ia3cli.training.run.run`` on the same rows (dynamic padding, length-grouped batches, its targets, the
  health monitor), ``training.precision`` set to the mode.

Tokens/s counts real (non-padding) tokens: the rows' mean token count x batch x steps / ``train_runtime``. Peak
memory is ``torch.cuda.max_memory_allocated`` over the run.

Serving (bf16 base, ``ia3 serve`` on the GPU, 8-token greedy completions, CLIENTS concurrent clients, closed loop):
256 distinct adapters (request i uses adapter i mod 256), the base alone (``model`` = the base), and PEFT's
``set_adapter`` server from bench/serve.py (one PeftModel on the GPU, requests one at a time).

Targets: bf16 training tokens/s >= 1.5x the seed script's; serving with 256 adapters >= 5x ``set_adapter`` and
>= 0.8x the base alone. Results: bench/results/gpu.json (with the GPU's name).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
from pathlib import Path

from _common import QUICK, SENTIMENT, WORK, quiet, verdict, write_result

STEPS = 10 if QUICK else 40
BATCH = 8
MAX_LENGTH = 512
LR = 3e-3
ROWS = 2048
MODES = ("fp32", "bf16", "4bit")
N_ADAPTERS = 16 if QUICK else 256
CLIENTS = 64
REQUESTS = {"ia3cli": 256 if QUICK else 1024, "base": 256 if QUICK else 1024, "set_adapter": 64 if QUICK else 128}
TIME_LIMIT = 60 if QUICK else 120
MODEL_DIR = WORK / "llama-3.2-1b-random"
DATA_DIR = WORK / "gpu-data"
LABELS = ["negative", "positive"]
TEMPLATE = "Review: {text}\nSentiment:"


def llama_1b_config():  # noqa: ANN201
    """Llama-3.2-1B's shapes (meta-llama/Llama-3.2-1B config.json), random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def texts() -> list[dict]:
    return [json.loads(line) for line in (SENTIMENT / "train.jsonl").read_text().splitlines() if line.strip()]


def build_model() -> Path:
    """The random 1B model and a BPE tokenizer, saved once."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "tokenizer.json").is_file():
        return MODEL_DIR
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama_1b_config(), dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    bpe.train_from_iterator([r["text"] for r in texts()] + [TEMPLATE, *LABELS], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.save_pretrained(tmp)
    tmp.replace(MODEL_DIR)
    return MODEL_DIR


def build_data() -> Path:
    """ROWS rows of 1-40 joined reviews (long and varied, so padding matters), labelled by the first review."""
    if (DATA_DIR / "train.jsonl").is_file():
        return DATA_DIR
    rng = random.Random(0)
    pool = texts()
    rows = []
    for _ in range(ROWS):
        picked = rng.sample(pool, rng.randint(1, 40))
        rows.append({"text": " ".join(r["text"] for r in picked), "label": picked[0]["label"]})
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    (DATA_DIR / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (DATA_DIR / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    return DATA_DIR


def mean_tokens(tokenizer, rows: list[dict]) -> float:  # noqa: ANN001
    """Mean real tokens per training row (prompt, verbaliser, EOS), cut at MAX_LENGTH as both trainers cut."""
    total = 0
    for r in rows:
        label = LABELS[r["label"]] if isinstance(r["label"], int) else r["label"]
        n = len(tokenizer(TEMPLATE.format(text=r["text"]) + " " + label)["input_ids"]) + 1
        total += min(n, MAX_LENGTH)
    return total / len(rows)


def seed_script(mode: str, out: Path) -> dict:
    """The copied script: pad to MAX_LENGTH, PEFT's default IA3 targets, a plain Trainer, the mode's precision."""
    import torch
    from datasets import load_dataset
    from peft import IA3Config, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    ds = load_dataset("json", data_files={"train": str(DATA_DIR / "train.jsonl")})["train"]

    def tokenize(batch: dict) -> dict:
        prompts = [TEMPLATE.format(text=t) + " " + LABELS[y] + tokenizer.eos_token for t, y in zip(
            batch["text"], batch["label"], strict=True)]  # fmt: skip
        enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH)
        enc["labels"] = [[t if m else -100 for t, m in zip(ids, mask, strict=True)] for ids, mask in zip(
            enc["input_ids"], enc["attention_mask"], strict=True)]  # fmt: skip
        return enc

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    kwargs: dict = {"dtype": torch.float32}
    if mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kwargs)
    if mode == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        bf16=mode != "fp32",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    torch.cuda.reset_peak_memory_stats()
    result = Trainer(model=model, args=args, train_dataset=ds).train()
    return {"train_runtime": result.metrics["train_runtime"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def ia3cli_run(mode: str, out: Path) -> dict:
    """``ia3 train`` on the same rows through ``ia3cli.training.run.run``, ``training.precision`` = the mode."""
    import torch

    from ia3cli.config.load import validate_mapping
    from ia3cli.training.run import run

    model: dict = {"name": str(MODEL_DIR), "task": "causal-lm"}
    if mode == "4bit":
        model |= {"quantization": "4bit", "bnb_4bit_compute_dtype": "bfloat16"}
    recipe = validate_mapping(
        {
            "model": model,
            "data": {
                "path": str(DATA_DIR),
                "label_names": LABELS,
                "prompt_template": TEMPLATE,
                "max_length": MAX_LENGTH,
                "eval_split": None,
            },  # fmt: skip
            "training": {
                "output_dir": str(out),
                "max_steps": STEPS,
                "batch_size": BATCH,
                "learning_rate": LR,
                "eval_strategy": "no",
                "save_strategy": "no",
                "load_best_model_at_end": False,
                "precision": "fp32" if mode == "fp32" else "bf16",
            },  # fmt: skip
        }
    )
    torch.cuda.reset_peak_memory_stats()
    result = run(recipe, overwrite=True, printer=quiet, report=False)
    return {"train_runtime": result.metrics["train_runtime"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def train_phase(tokens_per_row: float) -> dict:
    per_mode = {}
    for mode in MODES:
        per_mode[mode] = {}
        for name, fn in (("seed", seed_script), ("ia3cli", ia3cli_run)):
            out = WORK / f"gpu-{name}-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            r = fn(mode, out)
            r["tokens_per_s"] = tokens_per_row * BATCH * STEPS / r["train_runtime"]
            per_mode[mode][name] = r
            print(f"train {mode} {name}: {r}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return per_mode


def serve_phase() -> dict:
    """req/s of ``ia3 serve`` with N_ADAPTERS adapters, of the base alone, and of PEFT ``set_adapter``."""
    from serve import build_adapters, drive, start

    root = build_adapters(N_ADAPTERS, {"name": str(MODEL_DIR), "task": "causal-lm", "dtype": "bfloat16"},
                          WORK / "gpu-adapters")  # fmt: skip
    prompts = [TEMPLATE.format(text=r["text"]) for r in texts()[:64]]
    names = [f"a{k:04d}" for k in range(N_ADAPTERS)]
    random.Random(0).shuffle(names)
    ours, ours_url = start([sys.executable, "-m", "ia3cli", "serve", str(root), "--port", "0", "--max-adapters",
                            str(N_ADAPTERS + 16), "--max-batch-size", str(CLIENTS), "--max-wait-ms", "20"])  # fmt: skip
    peft, peft_url = start([sys.executable, str(Path(__file__).with_name("serve.py")), "--baseline-server", str(root)])
    phases = {}
    try:
        for label, url, models in (("ia3cli", ours_url, names), ("base", ours_url, [str(MODEL_DIR)]),
                                   ("set_adapter", peft_url, names)):  # fmt: skip
            asyncio.run(drive(url, models, prompts, len(models), min(CLIENTS, len(models)), 3600, 1))  # load them
            phases[label] = asyncio.run(drive(url, models, prompts, REQUESTS[label], CLIENTS, TIME_LIMIT))
            print(f"serve {label}: {phases[label]}", flush=True)
    finally:
        for proc in (ours, peft):
            proc.terminate()
            proc.wait(60)
    return phases


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device: nothing measured, nothing written")
        return
    from transformers import AutoTokenizer

    device = torch.cuda.get_device_name()
    build_model()
    build_data()
    rows = [json.loads(line) for line in (DATA_DIR / "train.jsonl").read_text().splitlines()]
    tokens_per_row = mean_tokens(AutoTokenizer.from_pretrained(MODEL_DIR), rows)
    training = train_phase(tokens_per_row)
    serving = serve_phase()

    ratios = {m: training[m]["ia3cli"]["tokens_per_s"] / training[m]["seed"]["tokens_per_s"] for m in MODES}
    vs_set_adapter = serving["ia3cli"]["requests_per_s"] / serving["set_adapter"]["requests_per_s"]
    vs_base = serving["ia3cli"]["requests_per_s"] / serving["base"]["requests_per_s"]
    rows_out = [
        ["gpu", f"train {m} tokens/s ia3cli / seed (peak GiB)",
         f"{training[m]['ia3cli']['tokens_per_s']:.0f} / {training[m]['seed']['tokens_per_s']:.0f} = "
         f"{ratios[m]:.2f}x ({training[m]['ia3cli']['peak_gib']:.1f} vs {training[m]['seed']['peak_gib']:.1f})",
         ">= 1.5x" if m == "bf16" else "", verdict(ratios[m] >= 1.5) if m == "bf16" else ""]
        for m in MODES
    ]  # fmt: skip
    rows_out += [
        ["gpu", f"serve {N_ADAPTERS} adapters req/s / set_adapter", f"{vs_set_adapter:.1f}x", ">= 5x",
         verdict(vs_set_adapter >= 5)],
        ["gpu", f"serve {N_ADAPTERS} adapters req/s / base alone", f"{vs_base:.2f}x", ">= 0.8x",
         verdict(vs_base >= 0.8)],
    ]  # fmt: skip
    write_result(
        "gpu",
        {
            "what": "training tokens/s and peak memory (fp32, bf16, 4-bit) vs the seed script; serving req/s with "
            "many adapters vs PEFT set_adapter and vs the base alone; on one GPU",
            "device": device,
            "target": "bf16 tokens/s >= 1.5x seed; serve >= 5x set_adapter; 256 adapters >= 0.8x base alone",
            "settings": {
                "model": "Llama-3.2-1B shape, random weights",
                "steps": STEPS,
                "batch_size": BATCH,
                "max_length": MAX_LENGTH,
                "learning_rate": LR,
                "rows": ROWS,
                "tokens_per_row": tokens_per_row,
                "adapters": N_ADAPTERS,
                "clients": CLIENTS,
                "requests": REQUESTS,
                "max_tokens": 8,
            },  # fmt: skip
            "training": training,
            "serving": serving,
            "ratios": {"train_tokens_per_s": ratios, "serve_vs_set_adapter": vs_set_adapter, "serve_vs_base": vs_base},
            "rows": rows_out,
        },
    )


if __name__ == "__main__":
    main()
