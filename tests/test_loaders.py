"""Original-LLaVA-format weights (official M3 / MQT checkpoints) map onto the stock classes and the resampler."""

import pytest
import torch

from vlm_compress.loaders import convert_original_llava, llava_config_from_original
from vlm_compress.modules.resampler import QueryResampler, ResamplerConfig
from vlm_compress.testing import build_llava, build_llava_next

# transformers 5.x name → original LLaVA codebase name, written out independently of the loader's table
TO_ORIGINAL = (
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
)


def to_original(state_dict):
    out = {}
    for key, value in state_dict.items():
        old, new = next((o, n) for o, n in TO_ORIGINAL if key.startswith(o))
        out[new + key[len(old):]] = value
    return out


@pytest.mark.parametrize("build", [build_llava, build_llava_next])
def test_original_format_round_trips_into_the_stock_class(tokenizer, build):
    source = build(tokenizer, seed=1)
    target = build(tokenizer, seed=2)
    hf, resampler = convert_original_llava(to_original(source.state_dict()))
    assert not resampler
    target.load_state_dict(hf, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_mqt_checkpoint_splits_into_llava_and_resampler(tokenizer):
    llava = build_llava(tokenizer)
    original = {k: v for k, v in to_original(llava.state_dict()).items() if not k.startswith("model.mm_projector.")}
    resampler = QueryResampler(ResamplerConfig(num_queries=16, kv_dim=32, embed_dim=32, num_heads=2))
    original.update({"model.mm_projector." + k: v for k, v in resampler.state_dict().items()})
    hf, weights = convert_original_llava(original)
    assert not any("multi_modal_projector" in k for k in hf)
    fresh = QueryResampler(ResamplerConfig(num_queries=16, kv_dim=32, embed_dim=32, num_heads=2))
    fresh.load_state_dict(weights, strict=True)
    assert torch.equal(fresh.query, resampler.query) and torch.equal(fresh.proj, resampler.proj)


def test_unknown_names_and_projectors_are_refused(tokenizer):
    with pytest.raises(ValueError, match="original-LLaVA"):
        convert_original_llava({"language_model.lm_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no stock equivalent"):
        llava_config_from_original({"mm_projector_type": "linear"}, None, 5)


def test_config_from_original_builds_the_same_model(tokenizer):
    source = build_llava_next(tokenizer)
    text = source.config.text_config
    original = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                    num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                    num_key_value_heads=text.num_key_value_heads, mm_vision_select_layer=-2,
                    mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
                    image_grid_pinpoints=source.config.image_grid_pinpoints)
    config = llava_config_from_original(original, source.config.vision_config, source.config.image_token_id)
    from transformers import LlavaNextForConditionalGeneration

    rebuilt = LlavaNextForConditionalGeneration(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in source.state_dict().items()}
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
