"""Adapter size on disk: IA3 against LoRA r8, in float32 and float16, on two models.

Measures the size of ``adapter_model.safetensors`` written by ``PeftModel.save_pretrained`` (and the number of
adapter parameters) for

- the quick-start all-MiniLM-L6-v2 (seq-cls; both adapters also save the 2-class head, 770 parameters);
- the ~102M-parameter Llama shape of ``memory.py`` (causal-lm, random weights);

IA3 as ia3cli builds it (``ia3.wrap`` with ia3cli's targets: keys, values, FFN down-projection), LoRA r8 with
PEFT's default targets (query/value projections). float16: the adapter parameters are cast before saving.

Target: reported (IA3 should be far smaller than LoRA r8).
"""

from __future__ import annotations

import shutil

from _common import WORK, causal_recipe, llama_100m_dir, quickstart_recipe, write_result


def build(model_name: str, method: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from ia3cli.models import loading as modeling
    from ia3cli.models import targets
    from ia3cli.tuners import ia3

    if model_name == "minilm":
        recipe = quickstart_recipe(WORK / "adapter-size")
        task = "SEQ_CLS"
    else:
        recipe = causal_recipe(llama_100m_dir(), WORK / "adapter-size")
        task = "CAUSAL_LM"
    base = modeling.load_base(recipe.model, recipe.num_labels)
    torch.manual_seed(0)
    if method == "ia3":
        plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
        return ia3.wrap(base, recipe, plan)
    return get_peft_model(base, LoraConfig(task_type=task, r=8, lora_alpha=16))


def main() -> None:
    import torch

    runs = []
    for model_name in ("minilm", "llama-100m"):
        for method in ("ia3", "lora_r8"):
            model = build(model_name, method)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for dtype in ("float32", "float16"):
                if dtype == "float16":
                    for p in model.parameters():
                        if p.requires_grad:
                            p.data = p.data.to(torch.float16)
                out = WORK / f"adapter-{model_name}-{method}-{dtype}"
                shutil.rmtree(out, ignore_errors=True)
                model.save_pretrained(str(out))
                size = (out / "adapter_model.safetensors").stat().st_size
                runs.append({"model": model_name, "method": method, "dtype": dtype, "params": params, "bytes": size})
                print(runs[-1], flush=True)
            del model
    by = {(r["model"], r["method"], r["dtype"]): r for r in runs}
    rows = []
    for model_name in ("minilm", "llama-100m"):
        for dtype in ("float32", "float16"):
            ia3, lora = by[(model_name, "ia3", dtype)], by[(model_name, "lora_r8", dtype)]
            rows.append(
                [
                    "adapter_size",
                    f"{model_name} {dtype}: IA3 / LoRA r8 (params)",
                    f"{ia3['bytes'] / 1024:.1f} KiB / {lora['bytes'] / 1024:.1f} KiB "
                    f"({ia3['params']:,} / {lora['params']:,}); {lora['bytes'] / ia3['bytes']:.1f}x smaller",
                    "report",
                    "",
                ]
            )
    write_result(
        "adapter_size",
        {
            "what": "size of adapter_model.safetensors from save_pretrained",
            "target": "report",
            "settings": {
                "lora": "r=8, alpha=16, PEFT default targets",
                "ia3": "ia3cli targets (k, v, ffn down)",
                "minilm_head": "both save the seq-cls head (modules_to_save)",
            },
            "runs": runs,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
