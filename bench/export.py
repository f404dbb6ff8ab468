"""`ia3 export` on the SmolLM2 quick-start run: how close the GGUF files are to the merged model, and their size.

    python bench/export.py                          # trains the causal quick start first (niced), then exports
    python bench/export.py --run runs/quickstart-causal   # an existing run of recipes/quickstart-causal.yaml

The run (recipes/quickstart-causal.yaml: SmolLM2-135M-Instruct read from its Q4_1 GGUF, IA3 on k/v/down) is exported
to q8_0, f16 and the default (k/v in the source's q4_1, ffn_down in q8_0). For each file, against the merged model
(``ia3cli.inference.merge.fold``, the model ``ia3 merge`` saves):

- the export's own proof (max |delta logits| on its 8 probe rows) and the file size;
- max |delta logits| and greedy agreement on 50 prompts (the first 50 validation prompts): the arg-max token at
  every prompt position, and 8 greedily generated tokens per prompt (identical continuations);
- the rank-classification accuracy of the file (as transformers' GGUF loader reads it) on the 100 validation rows,
  next to ``ia3 eval`` of the run. Target: equal within one row.

Only the three k/v/down tensors of each block are re-quantised; every other tensor is the source file's. Not done
here: loading the files with llama.cpp itself (llama-cpp-python has to be compiled from source, which this
offline 2-core machine cannot do in reasonable time), so runtime parity with llama.cpp is not measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import QUICK, ROOT, WORK, Timer, verdict, write_result

RECIPE = ROOT / "recipes" / "quickstart-causal.yaml"
PROMPTS = 50
NEW_TOKENS = 8


def train(out: Path) -> Path:
    """The causal quick start, trained as the README says (niced: the machine is shared)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    steps = ["--set", "training.max_steps=5"] if QUICK else []
    cmd = ["nice", sys.executable, "-m", "ia3cli", "train", str(RECIPE), "--set", f"training.output_dir={out}"]
    subprocess.run([*cmd, *steps, "--overwrite"], check=True, cwd=ROOT)
    return out


def prompts(recipe: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[list[int]]:
    from ia3cli.data.encoding import encode_row

    return [encode_row(row, recipe, tokenizer, index=i)["input_ids"] for i, row in enumerate(rows, 1)]


def agreement(merged: Any, exported: Any, tokenizer: Any, ids: list[list[int]]) -> dict[str, float]:
    """Max |delta logits| and arg-max agreement over every prompt position; identical greedy continuations."""
    import torch

    diff, same_pos, positions, same_gen, same_tokens = 0.0, 0, 0, 0, 0
    with torch.inference_mode():
        for row in ids:
            x = torch.tensor([row])
            a, b = merged(input_ids=x).logits[0], exported(input_ids=x).logits[0]
            diff = max(diff, float((a - b).abs().max()))
            same_pos += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += len(row)
            kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            ga = merged.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(row) :]
            gb = exported.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(row) :]
            same_gen += int(torch.equal(ga, gb))
            first_diff = next(
                (i for i, (p, q) in enumerate(zip(ga.tolist(), gb.tolist(), strict=False)) if p != q), None
            )
            same_tokens += NEW_TOKENS if first_diff is None else first_diff
    return {
        "prompt_max_abs_diff": diff,
        "argmax_agreement": same_pos / positions,
        "identical_generations": same_gen / len(ids),
        "generated_tokens_before_first_difference": same_tokens / (len(ids) * NEW_TOKENS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="An existing run of recipes/quickstart-causal.yaml.")
    parser.add_argument("--quick", action="store_true", help="Smoke run (5 training steps).")
    parser.add_argument("--types", default="q8_0,f16,default", help="Comma-separated; default: the source's type.")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ia3cli.config.load import load_recipe
    from ia3cli.data.sources import load_split
    from ia3cli.errors import RunError
    from ia3cli.inference.export import export
    from ia3cli.inference.merge import fold
    from ia3cli.scoring.eval_command import run_eval
    from ia3cli.scoring.evaluation import evaluate

    run_dir = args.run or train(WORK / "export" / "qs-run")
    recipe = load_recipe(run_dir / "recipe.yaml")
    with Timer() as t_eval:
        run_metrics = run_eval(
            str(run_dir), recipe_path=None, data=None, split=None, overrides=[], full_precision=False
        )
    merged, tokenizer, probe = fold(run_dir, recipe, lambda tag, text: print(tag, text))
    rows = list(load_split(recipe.data, recipe.data.eval_split))
    ids = prompts(recipe, tokenizer, rows[:PROMPTS])
    merged_metrics = evaluate(merged, tokenizer, recipe, rows)
    source = Path(recipe.model.path) / recipe.model.gguf_file
    results: list[dict[str, Any]] = []
    for type_name in [None if t == "default" else t for t in args.types.split(",")]:
        out = WORK / "export" / f"qs-{type_name or 'default'}.gguf"
        try:
            with Timer() as t_export:
                report = export(run_dir, out, type_name=type_name, force=True, printer=print)
        except RunError as exc:  # the proof failed: record it, the other types still run
            results.append({"type": type_name or "default", "proof_failed": exc.message})
            continue
        exported = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
        exported.eval()
        measured = agreement(merged, exported, tokenizer, ids)
        accuracy = evaluate(exported, tokenizer, recipe, rows)["accuracy"]
        del exported
        results.append(
            {
                "type": type_name or f"default ({'/'.join(report['tensor_types'])})",
                "tensor_types": report["tensor_types"],
                "export_seconds": t_export.s,
                "proof_max_abs_diff": report["max_abs_diff"],
                "proof_tolerance": report["tolerance"],
                "proof_greedy_agreement": report["greedy_agreement"],
                **measured,
                "rank_accuracy": accuracy,
                "rank_accuracy_rows_off": round(abs(accuracy - run_metrics["accuracy"]) * len(rows)),
                "mib": report["bytes"] / 2**20,
            }
        )
        print(results[-1])
    within_one_row = all(r.get("rank_accuracy_rows_off", 99) <= 1 for r in results)
    rows_table = [
        [
            "export",
            f"{r['type']}: max abs dlogits {r['prompt_max_abs_diff']:.3f}, argmax {r['argmax_agreement']:.1%}, "
            f"same 8-token generations {r['identical_generations']:.0%}, accuracy {r['rank_accuracy']:.2f}, "
            f"{r['mib']:.1f} MiB",
            f"eval of the run {run_metrics['accuracy']:.2f}",
            "accuracy within 1 row",
            verdict(r["rank_accuracy_rows_off"] <= 1),
        ]
        for r in results
        if "proof_failed" not in r
    ] + [
        ["export", f"{r['type']}: {r['proof_failed']}", "", "proof passes", "MISSED"]
        for r in results
        if "proof_failed" in r
    ]
    write_result(
        "export",
        {
            "what": "ia3 export of the SmolLM2 quick-start run vs the merged float32 model",
            "settings": {
                "run": str(run_dir),
                "prompts": PROMPTS,
                "new_tokens": NEW_TOKENS,
                "validation_rows": len(rows),
            },
            "source_gguf": {"file": source.name, "mib": source.stat().st_size / 2**20},
            "run_eval": {"accuracy": run_metrics["accuracy"], "seconds": t_eval.s},
            "merged_accuracy": merged_metrics["accuracy"],
            "merge_max_abs_diff": probe.diff32,
            "exports": results,
            "llama_cpp": "not run: llama-cpp-python must be compiled from source, not possible offline on 2 cores",
            "accuracy_within_one_row": within_one_row,
            "rows": rows_table,
        },
    )


if __name__ == "__main__":
    main()
