"""Distance from the compute floor: one training step / one forward pass, on the same batch.

Measures, for the quick-start model (all-MiniLM-L6-v2, seq-cls) on one batch of 32 real training rows (padded to
their longest row, as ia3cli's collator does):

- forward: ``model(**batch)`` under ``torch.inference_mode()`` (the floor: a step must at least run this);
- step: forward + backward + ``AdamW.step()`` + ``zero_grad`` in train mode;

for IA3 exactly as ia3cli builds it (``preflight.run`` targets + ``ia3.build``), LoRA r8 (PEFT default BERT
targets, query/value) and full fine-tuning. Warm-up iterations first, then the median of N timed iterations; the
forward and step timings alternate so load changes hit both.

The plain (unwrapped) model's forward is timed in the same loop too, so ``step / plain-model forward`` also
shows what the adapter's own forward overhead adds.

Target: IA3 step / forward <= 2.3x (a backward pass that only needs activation gradients costs about one forward).
"""

from __future__ import annotations

import time

from _common import QUICK, WORK, median, quickstart_recipe, verdict, write_result

BATCH = 32
WARMUP = 2 if QUICK else 5
ITERS = 5 if QUICK else 25


def batch_and_models():
    """The first 32 training rows, collated by ia3cli, and the three model builders."""
    import torch

    from ia3cli.data import encoding as data
    from ia3cli.models import loading as modeling
    from ia3cli.training import preflight
    from ia3cli.tuners.ia3 import build

    recipe = quickstart_recipe(WORK / "floor", training={"batch_size": BATCH})
    plan = preflight.run(recipe).plan
    tokenizer = modeling.load_tokenizer(recipe.model)
    train_ds, _, collator = data.build(recipe, tokenizer)
    batch = collator([train_ds[i] for i in range(BATCH)])

    def ia3():
        torch.manual_seed(0)
        return build(recipe, plan)[0]

    def lora():
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        base = modeling.load_base(recipe.model, recipe.num_labels)
        return get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16))

    def full():
        torch.manual_seed(0)
        return modeling.load_base(recipe.model, recipe.num_labels)

    return batch, {"ia3": ia3, "lora_r8": lora, "full": full}, full


def measure(model, batch, base) -> dict:
    """Alternate forward, step and (for reference) the plain base model's forward; medians after warm-up."""
    import torch

    model.train()
    base.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def forward(m=model) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            m(**batch)
        return time.perf_counter() - t0

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(WARMUP):
        forward()
        step()
        forward(base)
    fwd, stp, plain = [], [], []
    for _ in range(ITERS):
        fwd.append(forward())
        stp.append(step())
        plain.append(forward(base))
    return {
        "forward_s": fwd,
        "step_s": stp,
        "base_forward_s": plain,
        "forward_median_s": median(fwd),
        "step_median_s": median(stp),
        "base_forward_median_s": median(plain),
        "ratio": median(stp) / median(fwd),
        "ratio_vs_base_forward": median(stp) / median(plain),
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> None:
    import torch

    batch, builders, plain = batch_and_models()
    base = plain()  # the unwrapped model, for the step / plain-forward column
    runs = {}
    for name, build in builders.items():
        runs[name] = measure(build(), batch, base)
        r = runs[name]
        print(
            f"{name}: forward {r['forward_median_s'] * 1e3:.1f} ms, step {r['step_median_s'] * 1e3:.1f} ms, "
            f"ratio {r['ratio']:.2f}, step / plain-model forward {r['ratio_vs_base_forward']:.2f}",
            flush=True,
        )
    ok = runs["ia3"]["ratio"] <= 2.3
    rows = [
        [
            "floor",
            f"{name} step/forward ({r['step_median_s'] * 1e3:.0f} / {r['forward_median_s'] * 1e3:.0f} ms)",
            f"{r['ratio']:.2f}x (vs plain-model forward {r['ratio_vs_base_forward']:.2f}x)",
            "<= 2.3x" if name == "ia3" else "",
            verdict(ok) if name == "ia3" else "",
        ]
        for name, r in runs.items()
    ]
    write_result(
        "floor",
        {
            "what": "median step time (fwd+bwd+AdamW) / median inference_mode forward time, same batch",
            "target": "IA3 <= 2.3x",
            "settings": {
                "batch_size": BATCH,
                "seq_len": int(batch["input_ids"].shape[1]),
                "warmup": WARMUP,
                "iterations": ITERS,
                "threads": torch.get_num_threads(),
                "mode": "train (dropout on)",
            },
            "runs": runs,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
