"""The device policy (ia3cli.models.device) on the CPU: names, defaults, missing devices, where inputs go, the
recipe's device_map and training.precision, and float32 IA3 vectors under a bfloat16 base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import validate_mapping
from ia3cli.errors import Ia3Error, RecipeError
from ia3cli.models import device as devices
from ia3cli.models import loading as modeling
from tests.conftest import make_run, tiny_recipe

runner = CliRunner()
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: missing on every machine


@pytest.mark.parametrize(
    ("name", "normal"), [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:3", "cuda:3"), ("mps", "mps")]
)
def test_device_names_are_checked_without_torch(name: str, normal: str) -> None:
    assert devices.check_name(name) == normal


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu", "cuda0", ""])
def test_unknown_device_names_are_refused(name: str) -> None:
    with pytest.raises(Ia3Error, match="is not a device") as err:
        devices.check_name(name)
    assert "auto, cpu, cuda, cuda:N or mps" in err.value.hint


def test_auto_takes_the_accelerator_when_there_is_one() -> None:
    got = devices.resolve("auto")
    if torch.cuda.is_available():
        assert got.type == "cuda"
    elif torch.backends.mps.is_available():
        assert got.type == "mps"
    else:
        assert got == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")


def test_a_missing_device_is_an_error_naming_it_and_the_devices_there() -> None:
    with pytest.raises(Ia3Error) as err:
        devices.resolve(MISSING_CUDA)
    assert f"'{MISSING_CUDA}' is not available" in err.value.message
    assert err.value.exit_code == 2
    assert "cpu" in err.value.hint
    if not torch.cuda.is_available():
        with pytest.raises(Ia3Error, match="'cuda' is not available: this machine has no CUDA device"):
            devices.resolve("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(Ia3Error, match="'mps' is not available"):
            devices.resolve("mps")


@pytest.mark.parametrize(
    ("device", "device_map", "expected"),
    [
        (None, "auto", {}),  # training: the Trainer places the model, the map does not apply
        ("cpu", None, {}),
        ("cpu", "auto", {}),  # an explicit device overrides the recipe's map
        ("auto", {"": "cpu"}, {"device_map": {"": "cpu"}}),  # auto: the recipe's map decides
        ("auto", "balanced", {"device_map": "balanced"}),
    ],
)
def test_load_arguments_for_each_device(device: str | None, device_map: object, expected: dict) -> None:
    if device == "auto" and device_map is None and torch.cuda.is_available():
        pytest.skip("auto is a GPU here")
    assert devices.load_kwargs(device, device_map) == expected


def test_auto_without_a_map_on_the_cpu_loads_as_from_pretrained_does() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        assert devices.load_kwargs("auto") == {"device_map": {"": str(devices.resolve("auto"))}}
    else:
        assert devices.load_kwargs("auto") == {}
    with pytest.raises(Ia3Error, match="is not available"):
        devices.load_kwargs(MISSING_CUDA)


# --- the recipe keys ----------------------------------------------------------------------------------------------


def _raw(tiny_model, tmp_path: Path, model: dict | None = None, training: dict | None = None) -> dict:
    return tiny_recipe(
        tiny_model("llama", "causal-lm"), "causal-lm", tmp_path / "run", model=model or {}, training=training or {}
    )


@pytest.mark.parametrize(
    "device_map", [None, "auto", "balanced", "sequential", {"model.embed_tokens": 0, "lm_head": "cpu", "": "cuda:1"}]
)
def test_device_map_values_that_validate(tiny_model, tmp_path: Path, device_map: object) -> None:
    assert validate_mapping(_raw(tiny_model, tmp_path, {"device_map": device_map})).model.device_map == device_map


@pytest.mark.parametrize(
    ("device_map", "says"),
    [("everywhere", "device_map"), ({"lm_head": "gpu7"}, "'lm_head' maps to 'gpu7'"), ({"x": -1}, "'x' maps to -1")],
)
def test_device_map_values_that_do_not(tiny_model, tmp_path: Path, device_map: object, says: str) -> None:
    with pytest.raises(RecipeError, match="model.device_map") as err:
        validate_mapping(_raw(tiny_model, tmp_path, {"device_map": device_map}))
    assert says in str(err.value)


def test_device_map_reaches_from_pretrained(tiny_model, tmp_path: Path) -> None:
    """With --device auto the recipe's map goes to accelerate (``auto`` on a CPU machine: all on the CPU, the same
    weights); a map naming a GPU this machine lacks is an error naming the module, before anything loads."""
    recipe = validate_mapping(_raw(tiny_model, tmp_path, {"device_map": "auto"}))
    tok = modeling.load_tokenizer(recipe.model)
    mapped = modeling.load_recipe_base(recipe, tok, "auto")
    plain = modeling.load_recipe_base(recipe, tok, "cpu")  # an explicit device: no map
    assert devices.input_device(mapped) == devices.resolve("auto")
    assert torch.equal(mapped.lm_head.weight.cpu(), plain.lm_head.weight)
    missing = validate_mapping(_raw(tiny_model, tmp_path, {"device_map": {"model": "cpu", "lm_head": MISSING_CUDA}}))
    with pytest.raises(Ia3Error, match=f"model.device_map: 'lm_head': '{MISSING_CUDA}' is not available"):
        modeling.load_recipe_base(missing, tok, "auto")
    assert devices.input_device(modeling.load_recipe_base(missing, tok, "cpu")) == torch.device("cpu")


@pytest.mark.parametrize(("precision", "flags"), [("fp32", (False, False)), ("bf16", (True, False))])
def test_precision_maps_to_the_trainer_flags(precision: str, flags: tuple[bool, bool]) -> None:
    assert devices.precision_flags(precision) == {"bf16": flags[0], "fp16": flags[1]}


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it() -> None:
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert devices.precision_flags("auto") == {"bf16": bf16, "fp16": False}
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="training.precision: fp16 mixed precision needs a CUDA GPU"):
            devices.precision_flags("fp16")


def test_precision_reaches_the_training_arguments(tiny_model, tmp_path: Path) -> None:
    from ia3cli.training.run import training_arguments

    recipe = validate_mapping(_raw(tiny_model, tmp_path, training={"precision": "bf16"}))
    args = training_arguments(recipe, tmp_path)
    assert args.bf16 and not args.fp16
    with pytest.raises(RecipeError, match="training.precision"):
        validate_mapping(_raw(tiny_model, tmp_path, training={"precision": "half"}))


# --- where inputs go, and the vectors' dtype ----------------------------------------------------------------------


def test_inputs_go_to_the_device_of_the_input_embeddings(tiny_model) -> None:
    """A model whose embeddings sit on ``meta`` (the rest on the CPU): inputs follow the embeddings, not the first
    parameter or the CPU default."""
    model = modeling.auto_class("causal-lm").from_pretrained(tiny_model("llama", "causal-lm"))
    model.model.embed_tokens.to("meta")
    assert devices.input_device(model) == torch.device("meta")
    batch = devices.to_inputs({"input_ids": torch.ones(1, 3, dtype=torch.long), "note": "kept"}, model)
    assert batch["input_ids"].device == torch.device("meta") and batch["note"] == "kept"
    assert model.lm_head.weight.device == torch.device("cpu")
    assert devices.input_device(torch.nn.Sequential()) == torch.device("cpu")  # no parameters at all


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ia3_vectors_stay_float32_under_a_half_precision_base(tiny_model, tmp_path: Path, dtype: str) -> None:
    """bf16 numbers near 1.0 are 2^-7 apart: an update of 1e-3 to a vector at 1.0 would round away. Both ways a
    vector is made (training's wrap, and loading a run for eval/merge) must keep float32."""
    from ia3cli.models import targets
    from ia3cli.tuners import ia3

    recipe = validate_mapping(_raw(tiny_model, tmp_path, {"dtype": dtype}))
    plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
    model, _ = ia3.build(recipe, plan)
    vectors = {n: p for n, p in model.named_parameters() if ".ia3_l." in n}
    assert vectors and {p.dtype for p in vectors.values()} == {torch.float32}
    assert model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    assert one + 1e-3 == one  # what storing the vectors in bf16 would do to a step (fp16: 2^-10 apart, rounded)

    run = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", model={"dtype": dtype})
    loaded, _ = ia3.load_run_model(run, validate_mapping(json_recipe(run)))
    assert {p.dtype for n, p in loaded.named_parameters() if ".ia3_l." in n} == {torch.float32}


def json_recipe(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())


# --- the commands -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "runs/x"],
        ["predict", "runs/x", "--input", "rows.jsonl"],
        ["serve", "runs/x"],
        ["merge", "runs/x", "out/x"],
        ["compare", "recipes/quickstart.yaml", "--methods", "zero-shot", "--out", "OUT"],
    ],
)
@pytest.mark.parametrize("device", [MISSING_CUDA, "tpu"])
def test_every_command_refuses_a_device_that_is_not_there(argv: list[str], device: str, tmp_path: Path) -> None:
    argv = [a.replace("OUT", str(tmp_path / "cmp")) for a in argv]
    result = runner.invoke(app, [*argv, "--device", device])
    assert result.exit_code == 2, result.output
    assert f"'{device}'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cmp").exists()


def test_eval_and_merge_run_on_the_device_asked_for(tiny_model, tmp_path: Path) -> None:
    run = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    result = runner.invoke(app, ["eval", str(run), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 16
    merged = runner.invoke(app, ["merge", str(run), str(tmp_path / "merged"), "--device", "cpu"])
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["device"] == "cpu"


# --- bench/gpu.py on a machine without CUDA -----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the GPU benchmark")
def test_the_gpu_benchmark_says_cuda_is_required_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result_file = root / "bench" / "results" / "gpu.json"
    before = result_file.stat().st_mtime_ns if result_file.exists() else None
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu.py")], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA device" in done.stdout
    assert (result_file.stat().st_mtime_ns if result_file.exists() else None) == before


def test_the_gpu_benchmark_model_has_llama_3_2_1b_shapes() -> None:
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", bench / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    with torch.device("meta"):
        model = modeling.auto_class("causal-lm").from_config(module.llama_1b_config())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.236e9, rel=0.01)  # Llama-3.2-1B: 1.24B


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a CUDA GPU")
def test_fp16_training_without_a_gpu_is_refused_before_anything_is_written(tiny_model, tmp_path: Path) -> None:
    from tests.conftest import write_recipe

    out = tmp_path / "run"
    raw = tiny_recipe(tiny_model("llama", "causal-lm"), "causal-lm", out, training={"precision": "fp16"})
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2, result.output
    assert "training.precision: fp16 mixed precision needs a CUDA GPU" in result.output
    assert "Traceback" not in result.output and not out.exists()
