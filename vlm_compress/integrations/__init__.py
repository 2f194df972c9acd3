"""Adapters that plug vlm-compress into third-party frameworks: ``lmms_eval`` (lmms-eval ≥ 0.7) and ``vllm`` (the
vLLM serving plugin; ``vllm_models`` holds its model classes and is imported only by vLLM)."""
