"""The Gradio demo: ``vlm-compress demo`` (:mod:`.app`); its UI-free parts are :mod:`.compare` and :mod:`.overlay`."""
