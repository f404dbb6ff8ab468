"""The recipe: its pydantic schema (the only list of keys, defaults and help) and its error wording."""
