"""Baseline unlearners (cards in shared/methods/README.md), one registered method per file."""
