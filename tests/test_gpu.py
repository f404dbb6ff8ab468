"""Every command on CUDA: train (fp32, bf16, 4-bit; causal-lm, seq-cls, seq2seq, tfew), eval, predict with mixed
adapters against PEFT per adapter, serve over loopback with mixed adapters on a 4-bit base against PEFT, compare
(ia3, lora, zero-shot, icl), merge; FSDP over every GPU (one included) with a full-precision and a 4-bit base. Each
test checks that the work ran on the GPU. Skipped without a CUDA device.

Run: ``pytest tests/test_gpu.py -m gpu -q`` on a machine with one GPU (bitsandbytes installed for the 4-bit cases).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import load_recipe
from ia3cli.models.device import input_device
from ia3cli.tuners import ia3
from tests.conftest import make_run, tiny_recipe, write_recipe
from tests.test_serve import make_adapters

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
runner = CliRunner()
NAMES = ["alpha", "beta", "gamma"]
PROMPTS = ["a warm , clever comedy", "the app is bad", "pretty good"]


@contextlib.contextmanager
def on_gpu() -> Iterator[None]:
    """Asserts that the block allocated CUDA memory (the work ran on the GPU, not on the CPU beside it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() > before, "nothing was allocated on the GPU"


def invoke(*argv: str) -> str:
    result = runner.invoke(app, list(argv))
    assert result.exit_code == 0, result.output
    return result.output


def peft_greedy(run_dir: Path, prompt: str, n: int, *, ignore_eos: bool = True) -> str:
    """Greedy text of plain PEFT with this one adapter, on the GPU; ``ignore_eos``: EOS is just another token (as
    the server's ``ignore_eos``), else generation stops there (as ``ia3 predict``)."""
    model, tok = ia3.load_run_model(run_dir, load_recipe(run_dir / "recipe.yaml"), device="cuda")
    model.eval()
    assert input_device(model).type == "cuda"
    ids = tok(prompt, return_tensors="pt").to(input_device(model))
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, pad_token_id=tok.pad_token_id, max_new_tokens=n)
    if ignore_eos:
        config.update(eos_token_id=None)
    with torch.no_grad():
        out = model.generate(**ids, generation_config=config)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# --- train ---------------------------------------------------------------------------------------------------------

TRAIN_CASES = [
    ("llama", "causal-lm", {}),
    ("bert", "seq-cls", {}),
    ("t5", "seq2seq", {}),
    ("llama", "causal-lm", {"objective": "tfew", "optimizer": "adafactor"}),
]
MODES = {
    "fp32": ({}, {"precision": "fp32"}),
    "bf16": ({}, {"precision": "bf16"}),
    "4bit": ({"quantization": "4bit", "bnb_4bit_compute_dtype": "bfloat16"}, {"precision": "bf16"}),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("kind", "task", "training"), TRAIN_CASES)
def test_train_on_cuda(tiny_model, tmp_path: Path, kind: str, task: str, training: dict, mode: str) -> None:
    model, precision = MODES[mode]
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model(kind, task), task, out, model=model, training={"max_steps": 6, **precision})
    with on_gpu():
        invoke("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    info = json.loads((out / "run.json").read_text())
    assert info["precision"] == precision["precision"] and info["device"] == torch.cuda.get_device_name()
    assert info["quantization"] == model.get("quantization", "none")
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
    assert json.loads((out / "health.json").read_text())["status"] in ("ok", "warning")
    vectors = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "ia3_l" in k}
    assert vectors and {v.dtype for v in vectors.values()} == {torch.float32}
    assert any(not torch.all(v == 1) for v in vectors.values()), "the vectors never moved"


# --- eval, merge, device_map ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("bert", "seq-cls"), ("t5", "seq2seq")])
def test_eval_and_merge_on_cuda(tiny_model, tmp_path: Path, kind: str, task: str) -> None:
    run = make_run(tmp_path, tiny_model(kind, task), task)
    with on_gpu():
        on_cuda = json.loads(invoke("eval", str(run), "--json", "--device", "cuda:0"))
    on_cpu = json.loads(invoke("eval", str(run), "--json", "--device", "cpu"))
    key = "accuracy" if "accuracy" in on_cpu else "loss"
    assert on_cuda["rows"] == on_cpu["rows"] == 16
    assert on_cuda[key] == pytest.approx(on_cpu[key], abs=1e-3)
    with on_gpu():
        invoke("merge", str(run), str(tmp_path / "merged"), "--device", "cuda")
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["device"].startswith("cuda") and report["max_abs_diff"] <= report["tolerance"]


def test_a_4bit_run_evaluates_on_cuda_quantised_and_in_full(tiny_model, tmp_path: Path) -> None:
    run = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", quantization="4bit")
    with on_gpu():
        quantised = json.loads(invoke("eval", str(run), "--json"))
        full = json.loads(invoke("eval", str(run), "--json", "--full-precision"))
    assert quantised["rows"] == full["rows"] == 16


def test_device_map_auto_places_the_base_on_the_gpus(tiny_model, tmp_path: Path) -> None:
    from ia3cli.config.load import validate_mapping
    from ia3cli.models import loading

    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run", model={"device_map": "auto"})
    recipe = validate_mapping(raw)
    base = loading.load_recipe_base(recipe, loading.load_tokenizer(recipe.model), "auto")
    assert {p.device.type for p in base.parameters()} == {"cuda"}
    assert input_device(base) == base.get_input_embeddings().weight.device
    cpu = loading.load_recipe_base(recipe, loading.load_tokenizer(recipe.model), "cpu")
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}


# --- predict, serve, compare ----------------------------------------------------------------------------------------


def test_predict_mixed_adapters_on_cuda_equals_peft_per_adapter(tiny_model, tmp_path: Path) -> None:
    root = make_adapters(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", NAMES)
    rows = [{"adapter": name, "text": prompt} for name in NAMES for prompt in PROMPTS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    with on_gpu():
        invoke("predict", str(root), "--input", str(tmp_path / "rows.jsonl"), "--output", str(out),
               "--max-new-tokens", "6", "--device", "cuda")  # fmt: skip
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == len(rows)
    for row, pred in zip(rows, preds, strict=True):
        expected = peft_greedy(root / row["adapter"], row["text"], 6, ignore_eos=False).strip()
        assert pred["prediction"] == expected, row


def test_serve_mixed_adapters_on_a_4bit_base_equals_peft(tiny_model, tmp_path: Path) -> None:
    from tests.test_serve import complete, metrics, serving

    root = make_adapters(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", NAMES, quantization="4bit")
    with on_gpu(), serving(root, max_adapters=8, max_batch_size=4, max_wait_ms=300) as (client, server):
        assert input_device(server.mixed.model).type == "cuda"
        assert any(type(m).__name__ == "Linear4bit" for m in server.mixed.model.modules())
        jobs = list(zip(NAMES, PROMPTS, strict=True))
        with ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch
            answers = list(pool.map(lambda job: complete(client, *job), jobs))
        sampled = complete(client, "beta", "pretty good", temperature=0.8, seed=3)  # sampling on the GPU
        seen = metrics(client)
        assert client.get("/health").json()["status"] == "ok"
    assert sampled.status_code == 200, sampled.text
    assert seen.get('ia3_batches_failed_total{kind="generate"}', 0) == 0
    for (name, prompt), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == peft_greedy(root / name, prompt, 6), name


def test_compare_on_cuda(tiny_model, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "unused")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "cmp"
    with on_gpu():
        invoke("compare", str(path), "--methods", "zero-shot,icl,ia3,lora", "--rows", "8", "--seeds", "1",
               "--out", str(out), "--device", "cuda")  # fmt: skip
    cells = {c["method"]: c for c in json.loads((out / "compare.json").read_text())["cells"]}
    assert set(cells) == {"zero-shot", "icl", "ia3", "lora"}
    for method, cell in cells.items():
        assert cell["metric"] is not None, method
        assert cell["peak_gpu_mib"], f"{method} did not run on the GPU"


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fsdp_over_every_gpu_equals_one_gpu(tiny_model, tmp_path: Path, quantization: str) -> None:
    """``training.distributed: fsdp`` under torchrun on NCCL, over every GPU there is (one is enough: world size 1
    still shards), with a bfloat16 base, plain or 4-bit (packed on the CPU as bfloat16 cells, then sharded after PEFT
    wraps it): one global batch split over the GPUs gives the vectors of one unsharded GPU run (bfloat16 weights,
    float32 vectors: a looser tolerance than the CPU test's)."""
    import sys

    from tests.test_distributed import _cli, _max_diff

    gpus = torch.cuda.device_count()
    model_dir = tiny_model("llama", "causal-lm")

    def recipe(out: Path, batch_size: int, distributed: str) -> dict:
        return tiny_recipe(
            model_dir, "causal-lm", out,
            model={"dtype": "bfloat16", "quantization": quantization, "bnb_4bit_compute_dtype": "bfloat16"},
            data={"train_samples": 8 * gpus, "eval_split": None},
            training={"max_steps": 3, "batch_size": batch_size, "group_by_length": False, "distributed": distributed},
        )  # fmt: skip

    out = tmp_path / "fsdp"
    path = write_recipe(tmp_path / "fsdp.yaml", recipe(out, 8, "fsdp"))
    run = _cli(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
        "-m", "ia3cli", "train", str(path),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"base tensors sharded over {gpus} rank(s), trained ones whole" in run.stdout, run.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["device"] != "cpu" and info["quantization"] == quantization
    one = runner.invoke(
        app, ["train", str(write_recipe(tmp_path / "one.yaml", recipe(tmp_path / "one", 8 * gpus, "ddp")))]
    )
    assert one.exit_code == 0, one.output
    assert _max_diff(out, tmp_path / "one") < 2e-3
    assert max((t - 1).abs().max().item() for t in load_file(out / "adapter_model.safetensors").values()) > 1e-3
