"""CUDA checks, run by ``eval/gpu_check.sh`` on a lent GPU (not collected by ``make test``: CI has no GPU).

Every test fails, never skips, without CUDA: this directory exists to be run where a GPU is.
The tiny random LLaVA from :mod:`vlm_compress.testing` in bf16 and fp32 on ``cuda``: identity at budget 1.0,
batch equals single, ``restore`` exact, kept counts, and each Triton kernel against its torch reference.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from vlm_compress import compress, restore
from vlm_compress.bench.run import method_arg
from vlm_compress.budget import tokens_to_keep
from vlm_compress.testing import (
    LlavaDims,
    build_llava,
    build_processor,
    build_tokenizer,
    random_images,
)

CUDA = torch.device(os.environ.get("VLM_COMPRESS_TEST_DEVICE", "cuda"))  # "cpu": a dry run of the logic
PROMPTS = ["USER: <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
METHODS = ["cls_attn", "visionzip", "random", "pool", "hired", "divprune", "fastv:layer=1", "h2o"]
N = (LlavaDims().image_size // LlavaDims().patch_size) ** 2


def test_cuda_is_present():
    assert torch.cuda.is_available(), "these tests need a CUDA device (eval/gpu_check.sh runs them on a lent GPU)"


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    images = random_images(2)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True).to(CUDA)
    singles = [processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt").to(CUDA) for i in range(2)]
    return tokenizer, batch, singles


def _greedy(model, inputs, steps=3):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", METHODS)
def test_identity_batch_restore_on_cuda(parts, spec, dtype):
    tokenizer, batch, singles = parts
    model = build_llava(tokenizer, dtype=dtype).to(CUDA)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    singles = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.items()} for s in singles]
    with torch.no_grad():
        ref = model(**batch).logits
    name, options = method_arg(spec, 1.0)
    compress(model, method=name, **options)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    restore(model)
    budget = 0.6 if name == "fastv" else 0.25  # fastv at K=1 of a 2-layer LLM reaches at least 0.5
    name, options = method_arg(spec, budget)
    compress(model, method=name, **options)
    out = _greedy(model, batch)
    if name not in ("fastv", "h2o", "pool"):  # encoder stage: the LLM sees exactly k visual tokens per image
        assert model.compression.stats.kept_per_image == [tokens_to_keep(budget, N)] * 2
    width = batch["input_ids"].shape[1]
    if dtype == torch.float32:  # bf16 batched vs single matmuls differ in rounding; fp32 must agree token for token
        for i, one in enumerate(singles):
            alone = _greedy(model, one)
            assert torch.equal(out[i, width:], alone[0, one["input_ids"].shape[1]:])
    restore(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def _both_backends(monkeypatch, fn):
    from vlm_compress import kernels

    monkeypatch.setenv(kernels.ENV, "triton")
    fused = fn()
    monkeypatch.setenv(kernels.ENV, "torch")
    return fused, fn()


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_triton_kernels_match_torch_on_cuda(monkeypatch):
    from vlm_compress import kernels

    torch.manual_seed(0)
    scores, tokens = torch.randn(4, 2880, device=CUDA), torch.randn(4, 2880, 64, device=CUDA)
    fused, composite = _both_backends(monkeypatch, lambda: kernels.topk_gather(scores, tokens, 576))
    for f, c in zip(_flat(fused), _flat(composite)):
        assert torch.equal(f, c)
    q, k = torch.randn(2, 8, 1, 64, device=CUDA), torch.randn(2, 8, 577, 64, device=CUDA)
    fused, composite = _both_backends(monkeypatch, lambda: kernels.row_attention(q, k, 0.125))
    torch.testing.assert_close(fused, composite, rtol=1e-4, atol=1e-5)
    a, b = torch.randn(2, 288, 64, device=CUDA), torch.randn(2, 288, 64, device=CUDA)
    fused, composite = _both_backends(monkeypatch, lambda: kernels.best_match(a, b))
    for f, c in zip(_flat(fused), _flat(composite)):
        torch.testing.assert_close(f, c, rtol=1e-4, atol=1e-5)

