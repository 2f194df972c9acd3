"""Inputs a user gets wrong produce a clear error that names the fix."""

import pytest
import torch

from vlm_compress import MethodConfig, compress, get_method, list_methods, register_method, restore
from vlm_compress.pruners.base import EncoderPruner


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan")])
def test_float_budget_out_of_range(model, budget):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        compress(model, budget=budget)


def test_float_budget_above_one_suggests_int(model):
    with pytest.raises(ValueError, match="pass an int"):
        compress(model, budget=64.0)


@pytest.mark.parametrize("budget", [0, -3])
def test_int_budget_below_one(model, budget):
    with pytest.raises(ValueError, match=">= 1"):
        compress(model, budget=budget)


@pytest.mark.parametrize("budget", ["0.2", True, None.__class__])
def test_budget_wrong_type(model, budget):
    with pytest.raises(TypeError, match="budget must be"):
        compress(model, budget=budget)


def test_unknown_method_suggests_close_names(model):
    with pytest.raises(ValueError, match="Did you mean 'cls_attn'"):
        compress(model, method="cls_atn")
    with pytest.raises(ValueError, match="Available: " + ", ".join(list_methods())):
        compress(model, method="nonsense")


def test_unsupported_model_class_names_supported_ones(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="Supported model classes: LlavaForConditionalGeneration"):
        compress(lm)


def test_base_model_gets_a_hint(model):
    with pytest.raises(TypeError, match="ForConditionalGeneration model"):
        compress(model.model)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compress("llava-hf/llava-1.5-7b-hf")


def test_compress_twice(model):
    compress(model, budget=0.2, method="random")
    with pytest.raises(ValueError, match="already compressed.*restore"):
        compress(model, budget=0.5, method="pool")
    restore(model)
    compress(model, budget=0.5, method="pool")  # fine after restore


def test_restore_uncompressed(model):
    with pytest.raises(ValueError, match="not compressed"):
        restore(model)


def test_unknown_method_kwarg_lists_valid_ones(model):
    with pytest.raises(TypeError, match=r"no option\(s\) \['lyer'\].*'layer'"):
        compress(model, method="cls_attn", lyer=3)
    assert not hasattr(model, "compression")


def test_kwargs_with_config_object(model):
    with pytest.raises(TypeError, match="only accepted with a single method name"):
        compress(model, method=get_method("pool")(), seed=1)


def test_conflicting_budgets(model):
    with pytest.raises(ValueError, match="conflicts"):
        compress(model, budget=0.5, method=get_method("pool")(budget=0.2))


def test_stacking_two_encoder_methods(model):
    with pytest.raises(ValueError, match="different stages"):
        compress(model, method=["random", "pool"])


def test_vision_layer_out_of_range(model):
    with pytest.raises(ValueError, match="out of range"):
        compress(model, method="cls_attn", layer=40)


def test_placeholder_count_mismatch(model, processor, images):
    inputs = processor(images=images[:1], text=["USER: <image> hi ASSISTANT:"], return_tensors="pt")
    ids = inputs["input_ids"]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = False  # drop one placeholder
    compress(model, 0.5, "random")
    with pytest.raises(ValueError, match="expands each image token"):
        model(input_ids=ids[keep].view(1, -1), pixel_values=inputs["pixel_values"])


def test_inputs_embeds_with_pixels(model, processor, images):
    inputs = processor(images=images[:1], text=["USER: <image> hi ASSISTANT:"], return_tensors="pt")
    compress(model, 0.5, "random")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])


def test_register_method_requires_stage():
    with pytest.raises(TypeError, match="stage"):
        register_method("broken")(MethodConfig)


def test_register_duplicate_name():
    import dataclasses

    @dataclasses.dataclass
    class Other(EncoderPruner):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("random")(Other)


def test_config_round_trip_every_method():
    for name in list_methods():
        config = get_method(name)(budget=0.3)
        again = MethodConfig.from_json(config.to_json())
        assert again == config and type(again) is type(config)
    with pytest.raises(ValueError, match="no 'method' key"):
        MethodConfig.from_dict({"budget": 0.2})


def test_anyres_only_method_on_a_single_grid_model(model):
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration"):
        compress(model, 0.2, "globalcom2")
    assert "compression" not in model.__dict__ and "forward" not in model.__dict__
