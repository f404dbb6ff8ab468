"""Using trained adapters offline: ``ia3 predict`` and ``ia3 merge``."""
