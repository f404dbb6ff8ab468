"""Training: ``ia3 train`` from pre-flight to a saved adapter, with its monitor, health rules and logbook."""
