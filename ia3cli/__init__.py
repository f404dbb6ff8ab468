"""ia3cli: fine-tune Hugging Face models with IA3 adapters from YAML recipes."""

__version__ = "0.1.0"
