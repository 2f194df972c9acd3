"""Adapters that plug vlm-compress into third-party evaluation frameworks (``lmms_eval``: lmms-eval ≥ 0.7)."""
