"""Data: splits from files or the hub, templates and encoding, in-context demonstrations."""
