"""``mqt``: the first m resampler queries become the visual tokens; weights are checked against the model."""

import pytest
import torch
from conftest import PROMPTS

from vlm_compress import compress, restore
from vlm_compress.modules.resampler import QueryResampler, ResamplerConfig
from vlm_compress.testing import build_llava, build_llava_next


@pytest.fixture()
def resampler_dir(tmp_path):
    torch.manual_seed(0)
    module = QueryResampler(ResamplerConfig(num_queries=9, kv_dim=32, embed_dim=32, num_heads=2))  # test dims
    module.save(tmp_path / "r")
    return str(tmp_path / "r"), module.eval()


def test_tokens_are_the_first_m_queries(model, batch, resampler_dir):
    path, module = resampler_dir
    compress(model, budget=4, method="mqt", resampler=path)
    with torch.no_grad():
        model(**batch)
    state = model.compression
    assert state.stats.kept_per_image == [4, 4, 4]
    vision = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    with torch.no_grad():
        expected = module(vision, 4)
    for got, want in zip(state.last.image_features, expected):
        torch.testing.assert_close(got, want)
    restore(model)
    compress(model, budget=1.0, method="mqt", resampler=path)  # 16 tokens asked, 9 queries exist
    model(**batch)
    assert model.compression.stats.kept_per_image == [9, 9, 9]


def test_mqt_batch_equals_single(model, processor, images, batch, resampler_dir):
    compress(model, budget=5, method="mqt", resampler=resampler_dir[0])
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for i in range(3):
            one = processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt")
            torch.testing.assert_close(model(**one).logits[:, -1], batched[i : i + 1], atol=1e-5, rtol=1e-4)


def test_mqt_refuses_mismatched_weights_and_anyres(tokenizer, resampler_dir, tmp_path):
    wide = QueryResampler(ResamplerConfig(num_queries=4, kv_dim=64, embed_dim=32, num_heads=2))
    wide.save(tmp_path / "wide")
    with pytest.raises(ValueError, match="this model needs 32 → 32"):
        compress(build_llava(tokenizer), 0.5, "mqt", resampler=str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="AnyRes"):
        compress(build_llava_next(tokenizer), 0.5, "mqt", resampler=resampler_dir[0])
    with pytest.raises(ValueError, match="train_mqt"):
        compress(build_llava(tokenizer), 0.5, "mqt", resampler=str(tmp_path))
