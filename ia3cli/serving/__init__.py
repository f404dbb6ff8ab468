"""``ia3 serve``: an OpenAI-compatible server of many IA3 adapters on one base."""
