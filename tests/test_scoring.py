"""CLS-row attention from q/k hooks equals the eager attention weights, while the tower stays on SDPA."""

import pytest
import torch

from vlm_compress.adapters import get_adapter
from vlm_compress.scoring import AttentionCapture
from vlm_compress.testing import build_llava


@pytest.fixture()
def pixels():
    return torch.randn(2, 3, 56, 56)


@pytest.mark.parametrize("head_reduce", ["mean", "sum", "max"])
@pytest.mark.parametrize("layer", [0, -2, -1])
def test_cls_row_matches_eager(tokenizer, pixels, head_reduce, layer):
    model = build_llava(tokenizer)
    tower = model.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    adapter = get_adapter(model)
    with AttentionCapture({layer: adapter.vision_attention(layer)}) as capture:
        tower(pixels)
    ours = capture.first_row_attention(layer, head_reduce, "probs")

    tower.set_attn_implementation("eager")
    eager = tower(pixels, output_attentions=True).attentions[layer][:, :, 0]  # [I, H, T]
    reference = {"mean": eager.mean(1), "sum": eager.sum(1), "max": eager.amax(1)}[head_reduce]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_patch_attention_means_match_eager(tokenizer, pixels):
    model = build_llava(tokenizer)
    tower = model.model.vision_tower
    with AttentionCapture({-2: get_adapter(model).vision_attention(-2)}, all_query_rows=True) as capture:
        tower(pixels)
    received, given = capture.attention_means(-2, "probs")
    tower.set_attn_implementation("eager")
    eager = tower(pixels, output_attentions=True).attentions[-2]  # [I, H, T, T] post-softmax
    patches = eager.mean(1)[:, 1:, 1:]  # FoPru's map: head mean, CLS row and column dropped (softmax over all T)
    torch.testing.assert_close(received, patches.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(given, patches.mean(2), rtol=1e-5, atol=1e-6)
    with AttentionCapture({-2: get_adapter(model).vision_attention(-2)}) as capture:
        tower(pixels)
    with pytest.raises(RuntimeError, match="all query rows"):
        capture.attention_means(-2)


def test_logits_are_pre_softmax(tokenizer, pixels):
    model = build_llava(tokenizer)
    adapter = get_adapter(model)
    with AttentionCapture({-2: adapter.vision_attention(-2)}) as capture:
        model.model.vision_tower(pixels)
    probs = capture.first_row_attention(-2, "max", "probs")
    q = capture.queries[-2].view(2, 1, 2, 16)
    k = capture.keys[-2].view(2, -1, 2, 16)
    manual = torch.einsum("bqhd,bnhd->bhqn", q, k)[:, :, 0] * 16**-0.5
    torch.testing.assert_close(capture.first_row_attention(-2, "mean", "logits"), manual.mean(1))
    torch.testing.assert_close(probs, manual.softmax(-1).amax(1))


def test_hooks_live_only_inside_the_block(tokenizer):
    model = build_llava(tokenizer)
    attn = get_adapter(model).vision_attention(-2)
    with AttentionCapture({-2: attn}):
        assert len(attn.q_proj._forward_hooks) == 1 and len(attn.k_proj._forward_hooks) == 1
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks


def test_no_attention_weights_requested(tokenizer, processor, images):
    """The compressed path never asks the tower for attention weights (it would fail under SDPA)."""
    from vlm_compress import compress

    model = build_llava(tokenizer)
    seen = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("output_attentions")), with_kwargs=True
    )
    compress(model, 0.25, "visionzip")
    model(**processor(images=images[:1], text=["USER: <image> hi ASSISTANT:"], return_tensors="pt"))
    handle.remove()
    assert seen and not any(seen)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
