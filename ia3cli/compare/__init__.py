"""``ia3 compare``: IA3 next to LoRA, full fine-tuning, a probe, zero-shot and in-context learning."""
