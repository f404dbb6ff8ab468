"""The ``ia3`` command line: the Typer app, one module per command group, shared options."""
