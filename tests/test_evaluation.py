"""`ia3 eval` on real tiny models: run dirs, merged dirs and base models; rank classification with a known answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.config.load import load_recipe, validate_mapping
from ia3cli.data.encoding import encode_causal, encode_row
from ia3cli.errors import Ia3Error, RecipeError
from ia3cli.inference.merge import merge
from ia3cli.models import loading as modeling
from ia3cli.scoring.eval_command import _load_model, render, run_eval
from ia3cli.scoring.evaluation import (
    after_training,
    choice_features,
    classification_metrics,
    rank_classify,
    score_choices,
)
from ia3cli.scoring.loglik import shared_prefix_length
from ia3cli.tuners import ia3
from tests.conftest import make_run, tiny_recipe, write_recipe

ROWS = [
    {"text": "A warm, clever comedy.", "label": 1},
    {"text": "The app bombards you with ads and upsells.", "label": 0},
    {"text": "Pretty good overall, and the price made it even better.", "label": 1},
    {"text": "Dinner was forgettable.", "label": 0},
    {"text": "This mystery kept me guessing right up until the final chapter.", "label": 1},
    {"text": "Great.", "label": 1},
]


def write_rows(path: Path, rows: list[dict] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(target: Path | str, **kwargs) -> dict:
    args = {"recipe_path": None, "data": None, "split": None, "overrides": [], "full_precision": False}
    return run_eval(str(target), **{**args, **kwargs})


def test_classification_metrics() -> None:
    metrics = classification_metrics([1, 1, 0, 1], [1, 0, 0, 1], 2)
    assert metrics == {"accuracy": 0.75, "f1": pytest.approx((2 / 3 + 4 / 5) / 2)}
    assert classification_metrics([], [], 2) == {"accuracy": 0.0, "f1": 0.0}


TASKS = [
    pytest.param("bert", "seq-cls", {"accuracy", "f1", "loss"}, id="bert-seq-cls"),
    pytest.param("llama", "causal-lm", {"loss", "perplexity", "accuracy", "f1"}, id="llama-causal-lm"),
    pytest.param("t5", "seq2seq", {"loss", "perplexity", "exact_match", "accuracy", "f1"}, id="t5-seq2seq"),
]


@pytest.mark.parametrize(("kind", "task", "keys"), TASKS)
def test_run_dir_and_merged_dir_give_the_same_metrics(tmp_path: Path, tiny_model, kind, task, keys) -> None:
    run_dir = make_run(tmp_path, tiny_model(kind, task), task)
    merge(run_dir, tmp_path / "merged")

    on_run = evaluate(run_dir)
    on_merged = evaluate(tmp_path / "merged")

    assert keys <= on_run.keys() and on_run["rows"] == 16 and on_run["split"] == "validation"
    assert (on_run["kind"], on_merged["kind"]) == ("run", "merged")
    for key in keys - {"loss", "perplexity"}:
        assert on_run[key] == on_merged[key], key
    assert on_run["loss"] == pytest.approx(on_merged["loss"], abs=1e-5)
    if "perplexity" in keys:
        assert on_run["perplexity"] == pytest.approx(math.exp(on_run["loss"]), rel=1e-12)
    for d in (run_dir, tmp_path / "merged"):
        saved = json.loads((d / "eval-validation.json").read_text())
        assert saved["loss"] == pytest.approx((on_run if d == run_dir else on_merged)["loss"])


def test_run_trained_in_4bit_evaluates_quantised_and_in_full_precision(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", quantization="4bit")
    merge(run_dir, tmp_path / "merged")
    quantised = evaluate(run_dir)
    full = evaluate(run_dir, full_precision=True)
    merged = evaluate(tmp_path / "merged")
    assert full["loss"] == pytest.approx(merged["loss"], abs=1e-5) and full["accuracy"] == merged["accuracy"]
    assert quantised["loss"] != pytest.approx(full["loss"], abs=1e-6)  # NF4 weights are not the float32 ones
    assert math.isfinite(quantised["loss"])


def biased_causal_lm(model_dir: Path, dest: Path, favour: str) -> Path:
    """The tiny Llama made to put almost all probability on the token ``favour``, whatever the input.

    A constant residual dimension (embedding column 0 = 50) survives the random layers; the final RMSNorm keeps it
    at about +5.6, and lm_head reads it only for ``favour`` (weight 5): a logit of ~28 against ~0 for the rest.
    """
    tokenizer = tf.AutoTokenizer.from_pretrained(str(model_dir))
    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(favour), 0] = 5.0
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


@pytest.mark.parametrize(
    ("favour", "accuracy", "f1"), [("positive", 4 / 6, (0.8 + 0.0) / 2), ("negative", 2 / 6, (0.5 + 0.0) / 2)]
)
def test_rank_classification_picks_the_verbaliser_the_model_prefers(
    tmp_path: Path, tiny_model, favour: str, accuracy: float, f1: float
) -> None:
    base = biased_causal_lm(tiny_model("llama", "causal-lm"), tmp_path / "biased", favour)
    data = write_rows(tmp_path / "rows.jsonl")  # 4 positive, 2 negative
    raw = tiny_recipe("unused", "causal-lm", tmp_path / "run", data={"path": str(data), "eval_split": "train"})
    recipe_file = write_recipe(tmp_path / "recipe.yaml", raw)

    metrics = evaluate(base, recipe_path=recipe_file)  # a base model + --recipe: the zero-shot baseline

    assert metrics["kind"] == "base" and metrics["rows"] == 6 and metrics["split"] == "train"
    assert metrics["accuracy"] == pytest.approx(accuracy) and metrics["f1"] == pytest.approx(f1)
    assert not list(base.glob("eval-*.json"))  # only run and merged dirs get a file


@pytest.mark.parametrize(("kind", "task"), [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("t5", "seq2seq")])
def test_choice_scores_are_the_unbatched_mean_logprob(tmp_path: Path, tiny_model, kind: str, task: str) -> None:
    labels = {"label_names": ["positive", "not good at all"]}  # verbalisers of different token lengths
    run_dir = make_run(tmp_path, tiny_model(kind, task), task, data=labels)
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    model.eval()

    with torch.no_grad():
        batched = score_choices(model, tokenizer, recipe, ROWS, batch_size=4)
        for row, scores in zip(ROWS, batched, strict=True):
            prompt = recipe.data.prompt_template.format(**row)
            for choice, score in zip(recipe.data.label_names, scores, strict=True):
                if task == "causal-lm":
                    enc = encode_causal(tokenizer, prompt, choice, recipe.data.max_length)
                    ids, target = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"][1:])
                    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                else:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                    target = tokenizer(text_target=choice, return_tensors="pt")["input_ids"]
                    logp = model(input_ids=ids, labels=target).logits[0].log_softmax(-1)
                    target = target[0]
                keep = target != -100
                expected = logp[keep].gather(-1, target[keep].unsqueeze(-1)).mean().item()
                assert score == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_scores_equal_the_full_sequences(tmp_path: Path, tiny_model, kind: str) -> None:
    from ia3cli.data import icl

    labels = {"label_names": ["positive", "not good at all"]}
    run_dir = make_run(tmp_path, tiny_model(kind, "causal-lm"), "causal-lm", data=labels)
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    model.eval()
    demos, k = icl.recipe_with_demonstrations(recipe, tokenizer, model, ROWS * 3, ROWS, k=6)
    features = [f for row in ROWS for f in choice_features(row, demos, tokenizer)]
    shared = shared_prefix_length(features)
    demo_tokens = len(tokenizer(icl.demonstration(ROWS[0], recipe, tokenizer.eos_token))["input_ids"])
    assert k == 6 and shared > 5 * demo_tokens  # the six demonstrations, not the rows' own prompts

    with torch.inference_mode():
        plain = score_choices(model, tokenizer, demos, ROWS, batch_size=3)
        cached = score_choices(model, tokenizer, demos, ROWS, batch_size=3, share_prefix=True)
    assert torch.tensor(cached) == pytest.approx(torch.tensor(plain), abs=1e-4)
    assert rank_classify(model, tokenizer, demos, ROWS, 3, share_prefix=True) == pytest.approx(
        rank_classify(model, tokenizer, demos, ROWS, 3)
    )


def test_shared_prefix_stops_before_the_first_scored_token() -> None:
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [5, 6, 7, 9, 9], "labels": [-100, -100, -100, 9, 9]},
    ]
    assert shared_prefix_length(rows) == 1  # token 1 predicts the first row's target at 2: it must be recomputed
    assert shared_prefix_length([rows[1], {"input_ids": [4, 6, 7], "labels": [-100, -100, 7]}]) == 0
    assert shared_prefix_length([]) == 0


def test_causal_loss_is_the_mean_nll_per_target_token(tmp_path: Path, tiny_model) -> None:
    data = write_rows(tmp_path / "rows.jsonl")
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", data={"path": str(data)})
    metrics = evaluate(run_dir, split="train", overrides=["training.batch_size=2"])  # padded batches of 4

    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in ROWS:
            enc = encode_row(row, recipe, tokenizer)
            n = sum(t != -100 for t in enc["labels"][1:])
            out = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]]))
            total, tokens = total + out.loss.item() * n, tokens + n
    assert metrics["rows"] == 6 and metrics["target_tokens"] == tokens
    assert metrics["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_after_training_adds_rank_classification(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(run_dir, recipe)
    model.train()
    added = after_training(model, tokenizer, recipe)
    assert set(added) == {"eval_accuracy", "eval_f1"} and model.training  # mode restored
    rows = list(evaluate(run_dir).items())
    assert added["eval_accuracy"] == dict(rows)["accuracy"]  # the same 16 sampled rows as `ia3 eval`

    no_eval = recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval_split": None})})
    assert after_training(model, tokenizer, no_eval) == {}
    seq_cls = validate_mapping(tiny_recipe(tiny_model("bert", "seq-cls"), "seq-cls", tmp_path / "x"))
    assert after_training(model, tokenizer, seq_cls) == {}


@pytest.mark.parametrize(
    ("favour", "accuracy", "f1"), [("positive", 4 / 6, (0.8 + 0.0) / 2), ("negative", 2 / 6, (0.5 + 0.0) / 2)]
)
def test_rank_classify_works_on_a_plain_model(
    tmp_path: Path, tiny_model, favour: str, accuracy: float, f1: float
) -> None:
    base = biased_causal_lm(tiny_model("llama", "causal-lm"), tmp_path / "biased", favour)
    recipe = validate_mapping(tiny_recipe(base, "causal-lm", Path("unused")))
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_base(recipe.model)  # no PeftModel around it
    model.train()
    metrics = rank_classify(model, tokenizer, recipe, ROWS, batch_size=4)
    assert metrics == {"accuracy": pytest.approx(accuracy), "f1": pytest.approx(f1)}  # 4 positive rows, 2 negative
    assert model.training  # mode restored


def test_rank_classify_matches_a_hand_computation(tiny_model) -> None:
    """On a random model: each row's prediction is the verbaliser with the higher unbatched mean log-prob."""
    recipe = validate_mapping(tiny_recipe(tiny_model("gpt2", "causal-lm"), "causal-lm", Path("unused")))
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_base(recipe.model).eval()
    preds = []
    with torch.no_grad():
        for row in ROWS:
            scores = []
            for choice in recipe.data.label_names:
                enc = encode_causal(tokenizer, recipe.data.prompt_template.format(**row), choice, 32)
                logp = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1].log_softmax(-1)
                target = torch.tensor(enc["labels"][1:])
                keep = target != -100
                scores.append(logp[keep].gather(-1, target[keep].unsqueeze(-1)).mean().item())
            preds.append(scores.index(max(scores)))
    expected = classification_metrics(preds, [row["label"] for row in ROWS], 2)
    assert rank_classify(model, tokenizer, recipe, ROWS, batch_size=3) == expected


def test_split_data_and_set_overrides(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls")
    own = evaluate(run_dir, split="train")
    on_train = evaluate(run_dir, split="train", overrides=["data.eval_samples=5"])
    assert (on_train["split"], on_train["rows"]) == ("train", 5)
    data = write_rows(tmp_path / "rows.jsonl")
    on_file = evaluate(run_dir, data=str(data), split="train")
    assert on_file["rows"] == 6 and on_file["data"] == str(data)

    # each result is named by what it evaluated: the run's own rows keep eval-train.json, other rows get their own
    saved = {p.name: json.loads(p.read_text()) for p in run_dir.glob("eval-train*.json")}
    assert len(saved) == 3 and saved["eval-train.json"]["rows"] == own["rows"]
    assert sorted(r["rows"] for r in saved.values()) == sorted([5, 6, own["rows"]])
    again = evaluate(run_dir, data=str(data), split="train")  # the same evaluation refreshes its own file
    assert again["rows"] == 6 and len(list(run_dir.glob("eval-train*.json"))) == 3

    mine = run_dir / "eval-validation.json"  # a file of the user's with an eval's name is never replaced
    mine.write_text("my notes\n")
    with pytest.raises(Ia3Error, match="not this evaluation's result"):
        evaluate(run_dir)
    assert mine.read_text() == "my notes\n"


def test_eval_errors_name_the_problem(tmp_path: Path, tiny_model) -> None:
    with pytest.raises(Ia3Error, match="target not found") as err:
        evaluate(tmp_path / "nope")
    assert err.value.hint and err.value.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(Ia3Error, match="neither a run dir"):
        evaluate(tmp_path / "empty")
    with pytest.raises(RecipeError, match="no recipe"):
        evaluate(tiny_model("llama", "causal-lm"))  # a base model needs --recipe
    with pytest.raises(RecipeError, match="no recipe"):
        evaluate("some-org/some-model")  # hub id without a recipe: no network needed to refuse

    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm")
    with pytest.raises(RecipeError, match="data.eval_split"):
        evaluate(run_dir, overrides=["data.eval_split=null"])
    (run_dir / "recipe.yaml").unlink()
    with pytest.raises(RecipeError, match="run dir has no recipe.yaml"):
        evaluate(run_dir)


def test_render_aligns_the_table() -> None:
    text = render({"target": "runs/x", "kind": "run", "split": "validation", "rows": 16, "accuracy": 0.8125})
    assert text.splitlines() == ["target    runs/x", "split     validation", "rows      16", "accuracy  0.8125"]


def test_cli_eval(tmp_path: Path, tiny_model) -> None:
    run_dir = make_run(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls")
    runner = CliRunner()
    table = runner.invoke(app, ["eval", str(run_dir)])
    assert table.exit_code == 0, table.output
    saved = json.loads((run_dir / "eval-validation.json").read_text())
    assert table.stdout == render(saved) + "\n"
    assert "classify 16/16" in table.stderr  # progress goes to stderr, the results alone to stdout
    assert (saved["split"], saved["rows"]) == ("validation", 16) and {"accuracy", "f1", "loss"} <= saved.keys()

    as_json = runner.invoke(app, ["eval", str(run_dir), "--json", "--split", "train", "--set", "data.eval_samples=4"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["rows"] == 4

    bad = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "target not found" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) <= 2


@pytest.mark.parametrize("full_precision", [False, True], ids=["as-trained", "full-precision"])
@pytest.mark.parametrize("kind", ["run", "merged", "base"])
def test_loading_the_target_leaves_the_recipe_as_it_was(tmp_path: Path, tiny_model, kind: str, full_precision) -> None:
    run_dir = make_run(tmp_path, tiny_model("llama", "causal-lm"), "causal-lm", quantization="8bit")
    recipe = load_recipe(run_dir / "recipe.yaml")
    target = {"run": run_dir, "merged": tmp_path / "merged", "base": tiny_model("gpt2", "causal-lm")}[kind]
    if kind == "merged":
        merge(run_dir, target)
    before = recipe.model_dump()

    model, _ = _load_model(kind, str(target), recipe, full_precision)

    assert recipe.model_dump() == before
    base = model.get_base_model() if kind == "run" else model
    assert base.config.model_type == ("gpt2" if kind == "base" else "llama")
    assert getattr(base, "is_loaded_in_8bit", False) == (kind != "merged" and not full_precision)
