"""Models: the families table, base loading (full, 4/8-bit, GGUF), and which modules IA3 targets."""
