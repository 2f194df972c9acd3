import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import pytest
import torch

from vlm_compress.testing import LlavaDims, build_llava, build_processor, build_tokenizer, random_images

torch.set_num_threads(2)

PROMPTS = [
    "USER: <image>\nwhat color is the square ? ASSISTANT:",
    "USER: <image>\nhow many ? ASSISTANT:",
    "USER: <image>\nis there a red circle at the top left of the image ? ASSISTANT:",
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return build_processor(tokenizer)


@pytest.fixture()
def model(tokenizer):
    return build_llava(tokenizer)


@pytest.fixture(scope="session")
def images():
    return random_images(3)


@pytest.fixture(scope="session")
def batch(processor, images):
    """Three prompts of different lengths, left-padded, one image each."""
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)


def single(processor, images, i):
    return processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt")


GRID = LlavaDims().image_size // LlavaDims().patch_size  # 4 → 16 visual tokens per image


def assert_batch_equals_single(model, processor, images, batch, steps=3):
    """Greedy generation on the left-padded batch equals each prompt generated alone (tokens and step-0 logits)."""
    greedy = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    out = model.generate(**batch, **greedy)
    width = batch["input_ids"].shape[1]
    for i in range(batch["input_ids"].shape[0]):
        one = model.generate(**single(processor, images, i), **greedy)
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -steps:])
        torch.testing.assert_close(out.logits[0][i], one.logits[0][0], rtol=1e-4, atol=1e-4)


def assert_video_batch_equals_single(model, processor, clips, prompts, batch, steps=2):
    """As :func:`assert_batch_equals_single` for a batch of videos (one per prompt)."""
    greedy = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    out = model.generate(**batch, **greedy)
    width = batch["input_ids"].shape[1]
    for i, clip in enumerate(clips):
        one = model.generate(**processor(videos=[clip], text=[prompts[i]], return_tensors="pt"), **greedy)
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -steps:])
        torch.testing.assert_close(out.logits[0][i], one.logits[0][0], rtol=1e-4, atol=1e-4)
