"""Entry point for ``python -m ia3cli`` (also what ``torchrun -m ia3cli`` runs)."""

from ia3cli.cli.app import main

if __name__ == "__main__":
    main()
