"""Trainable building blocks some methods add to a model (kept apart from the training-free pruners)."""
