"""The Gradio demo: ``vlm-compress demo`` (:mod:`.app`); its UI-free parts are :mod:`.compare` (images), :mod:`.video`
(videos) and :mod:`.overlay`."""
