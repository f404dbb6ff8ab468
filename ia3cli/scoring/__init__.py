"""Scoring: the sequence log-likelihood, rank classification and the metrics of ``ia3 eval``."""
