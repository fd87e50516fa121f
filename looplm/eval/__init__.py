"""Evaluation: what each loop step buys (loss, exact-match accuracy, exit behaviour)."""
