"""How real users hold models: accelerate hooks (device_map, offload), PEFT and subclasses, copies and pickles,
interrupted compress calls, static caches and gradient checkpointing. Each works or is refused clearly."""

import copy
import io
import pickle

import pytest
import torch
from conftest import PROMPTS
from transformers import LlavaForConditionalGeneration

from vlm_compress import compress, list_methods, restore
from vlm_compress import patching
from vlm_compress.modules.pmod import TokenRouters
from vlm_compress.testing import LlavaDims, build_llava

LAYERS = 4
# every method that runs on the random test LLaVA (globalcom2 is AnyRes-only; mqt needs a trained resampler)
ENCODER = [m for m in list_methods("encoder") if m not in ("globalcom2", "mqt", "quota")]
IN_LLM = ["fastv:layer=1", "mustdrop_llm", "atp:heads=None", "pmod", "h2o", "mustdrop+mustdrop_llm"]


@pytest.fixture()
def deep(tokenizer):
    return build_llava(tokenizer, LlavaDims(text_layers=LAYERS))


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    path = tmp_path_factory.mktemp("routers") / "routers"
    routers = TokenRouters(32, list(range(LAYERS)))
    generator = torch.Generator().manual_seed(0)
    for router in routers.routers.values():
        router.weight.data = torch.randn(router.weight.shape, generator=generator)
    routers.save(path)
    return str(path)


def method_args(spec, routers, budget=0.5):
    """``compress`` keyword arguments for a spec (``a+b`` stacks stages)."""
    from vlm_compress.bench.run import method_arg

    if spec == "pmod":
        return {"method": "pmod", "budget": budget, "routers": routers}
    method, options = method_arg(spec, budget)
    return {"method": method, **options}


def greedy(model, inputs, steps=3):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# -- accelerate ---------------------------------------------------------------------------------------------------


def hooked(model, how):
    """The model under accelerate's hooks: a per-module device map (what device_map="auto" gives) or CPU offload."""
    from accelerate import cpu_offload, dispatch_model

    if how == "device_map":
        device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                      "model.language_model": "cpu", "lm_head": "cpu"}
        return dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    return cpu_offload(model, execution_device=torch.device("cpu"))


@pytest.mark.parametrize("how", ["device_map", "cpu_offload"])
@pytest.mark.parametrize("spec", ENCODER + IN_LLM)
def test_accelerate_hooked_model_compresses_generates_and_restores(deep, tokenizer, batch, routers, how, spec):
    plain = copy.deepcopy(deep)
    reference = greedy(plain, batch)
    compress(plain, **method_args(spec, routers))
    expected = greedy(plain, batch)

    model = hooked(deep, how)
    assert "forward" in model.__dict__  # accelerate's own instance-level forward
    accelerate_forward = model.__dict__["forward"]
    compress(model, **method_args(spec, routers))
    assert_same_generation(greedy(model, batch), expected)
    restore(model)
    assert model.__dict__["forward"] is accelerate_forward  # accelerate's hook is put back, not dropped
    assert_same_generation(greedy(model, batch), reference)
    assert not patching.patched_modules(model)


def test_restore_refuses_when_accelerate_wrapped_the_compressed_model(deep, batch):
    compress(deep, budget=0.5, method="fastv", layer=1)
    hooked(deep, "device_map")
    with pytest.raises(RuntimeError, match="remove_hook_from_module"):
        restore(deep)
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(deep, recurse=True)
    restore(deep)
    assert not patching.patched_modules(deep)


# -- atomic compress ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cls_attn", "fastv:layer=1", "mustdrop+mustdrop_llm"])
def test_a_failure_inside_compress_leaves_nothing_behind(deep, batch, routers, monkeypatch, spec):
    reference = deep(**batch).logits
    real = patching.patch_method
    calls = []

    def count(module, name, impl):
        calls.append(name)
        real(module, name, impl)

    monkeypatch.setattr(patching, "patch_method", count)
    import vlm_compress.api as api
    import vlm_compress.stages.prefill as prefill

    monkeypatch.setattr(api, "patch_method", count)
    monkeypatch.setattr(prefill, "patch_method", count)
    restore(compress(deep, **method_args(spec, routers)))
    total = len(calls)
    assert total >= 2
    for fail_at in range(total):  # inject a failure at every patching step in turn
        seen = []

        def failing(module, name, impl):
            if len(seen) == fail_at:
                raise RuntimeError("injected")
            seen.append(name)
            real(module, name, impl)

        monkeypatch.setattr(api, "patch_method", failing)
        monkeypatch.setattr(prefill, "patch_method", failing)
        with pytest.raises(RuntimeError, match="injected"):
            compress(deep, **method_args(spec, routers))
        assert not patching.patched_modules(deep) and "compression" not in deep.__dict__
        assert torch.equal(deep(**batch).logits, reference)
    monkeypatch.setattr(api, "patch_method", real)
    monkeypatch.setattr(prefill, "patch_method", real)
    compress(deep, **method_args(spec, routers))  # and compress works afterwards
    restore(deep)


def test_restore_clears_leftover_patches(deep, batch):
    reference = deep(**batch).logits
    compress(deep, budget=0.5, method="fastv", layer=1)
    del deep.__dict__["compression"]  # what an interrupted compress of an older version could leave
    with pytest.raises(RuntimeError, match="call vlm_compress.restore"):
        compress(deep, budget=0.5, method="fastv", layer=1)
    restore(deep)
    assert not patching.patched_modules(deep)
    assert torch.equal(deep(**batch).logits, reference)
    with pytest.raises(ValueError, match="not compressed"):
        restore(deep)


# -- copies -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cls_attn", "fastv:layer=1", "h2o"])
def test_deepcopy_gives_an_independent_compressed_copy(deep, batch, routers, spec):
    compress(deep, **method_args(spec, routers))
    expected = greedy(deep, batch)
    twin = copy.deepcopy(deep)
    assert twin.compression is not deep.compression and twin.compression.adapter.model is twin
    assert_same_generation(greedy(twin, batch), expected)
    assert twin.compression.stats is not None
    with torch.no_grad():
        twin.lm_head.weight.zero_()  # the copy runs its own weights...
    assert twin(**batch).logits.abs().max() == 0
    assert_same_generation(greedy(deep, batch), expected)  # ...and the original is untouched
    restore(twin)
    assert "compression" in deep.__dict__ and not patching.patched_modules(twin)


def test_pickle_and_torch_save_carry_the_compression(deep, batch):
    # before any image call: transformers 5.24 itself installs an unpicklable hook on the vision tower at the first one
    compress(deep, budget=0.5, method="fastv", layer=1)
    buffer = io.BytesIO()
    torch.save(deep, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = pickle.loads(pickle.dumps(deep))
    expected = greedy(deep, batch)
    assert_same_generation(greedy(loaded, batch), expected)
    assert_same_generation(greedy(twin, batch), expected)
    restore(loaded)
    restore(deep)
    assert loaded.forward.__func__ is LlavaForConditionalGeneration.forward
    torch.testing.assert_close(loaded(**batch).logits, deep(**batch).logits)


def test_save_pretrained_of_a_compressed_model_is_clean(deep, tmp_path):
    compress(deep, budget=0.5, method="fastv", layer=1)
    deep.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert not patching.patched_modules(reloaded) and "compression" not in reloaded.__dict__
    restore(deep)
    for (name, a), (_, b) in zip(deep.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


# -- subclasses and PEFT ------------------------------------------------------------------------------------------


def test_a_subclass_of_a_supported_class_is_supported(tokenizer, batch):
    class MyLlava(LlavaForConditionalGeneration):
        pass

    model = build_llava(tokenizer)
    sub = MyLlava(model.config).eval()
    sub.load_state_dict(model.state_dict())
    compress(model, budget=0.5, method="cls_attn")
    compress(sub, budget=0.5, method="cls_attn")
    assert_same_generation(greedy(sub, batch), greedy(model, batch))


def test_peft_lora_model_compresses_generates_and_restores(deep, batch):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    model = get_peft_model(deep, lora).eval()
    reference = greedy(model, batch)
    out = compress(model, budget=0.5, method="fastv", layer=1)
    assert out is model and model.compression.stats is None
    compressed_out = greedy(model, batch)
    assert model.compression.stats.layer_visual_tokens[-1] < model.compression.stats.layer_visual_tokens[0]
    assert not torch.equal(compressed_out.logits[0], reference.logits[0])
    restore(model)
    assert_same_generation(greedy(model, batch), reference)


# -- static cache and gradient checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fastv:layer=1", "h2o"])
def test_in_llm_methods_refuse_a_static_cache(deep, batch, routers, spec):
    compress(deep, **method_args(spec, routers))
    with pytest.raises(ValueError, match="static"):
        deep.generate(**batch, max_new_tokens=2, cache_implementation="static")


def test_encoder_methods_work_with_a_static_cache(deep, batch):
    compress(deep, budget=0.5, method="cls_attn")
    dynamic = deep.generate(**batch, max_new_tokens=3, do_sample=False)
    static = deep.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_pmod_trains_under_gradient_checkpointing(deep, batch, routers):
    compress(deep, budget=0.5, method="pmod", routers=routers)
    labels = batch["input_ids"].clone()
    deep.train()
    loss = deep(**batch, labels=labels).loss
    loss.backward()
    plain = {n: p.grad.clone() for n, p in deep.named_parameters() if p.grad is not None}
    deep.zero_grad()
    deep.gradient_checkpointing_enable()
    checkpointed = []
    for i, layer in enumerate(deep.model.language_model.layers):  # count the checkpointed layer calls
        def counting(function, *args, real=layer._gradient_checkpointing_func, i=i, **kwargs):
            checkpointed.append(i)
            return real(function, *args, **kwargs)

        layer._gradient_checkpointing_func = counting
    loss_ckpt = deep(**batch, labels=labels).loss
    assert checkpointed == list(range(LAYERS))
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in plain.items():
        torch.testing.assert_close(dict(deep.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)


def test_the_llm_called_directly_after_a_compressed_generate(deep, batch, processor):
    compress(deep, budget=0.5, method="fastv", layer=1)
    greedy(deep, batch)
    text = processor.tokenizer(PROMPTS[:1], return_tensors="pt")
    out = deep.model.language_model(input_ids=text["input_ids"])  # not through the compressed model
    restore(deep)
    assert torch.equal(out.last_hidden_state, deep.model.language_model(input_ids=text["input_ids"]).last_hidden_state)


# -- option validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "options", "error", "message"), [
    ("fopru", {"kind": "bogus"}, ValueError, r"option 'kind' of 'fopru' must be one of \['probs', 'logits'\]"),
    ("visionzip", {"contextual_ratio": -1}, ValueError, r"'contextual_ratio' of 'visionzip' must be in \[0, 1\]"),
    ("visionzip", {"contextual_ratio": 2.0}, ValueError, r"must be in \[0, 1\], got 2.0"),
    ("cls_attn", {"layer": "x"}, TypeError, r"option 'layer' of 'cls_attn' must be an int, got 'x' \(str\)"),
    ("cls_attn", {"layer": 2.5}, TypeError, r"must be an int, got 2.5 \(float\)"),
    ("random", {"seed": "a"}, TypeError, r"option 'seed' of 'random' must be an int"),
    ("hired", {"alpha": 1.5}, ValueError, r"'alpha' of 'hired' must be in \[0, 1\]"),
    ("globalcom2", {"temperature": 0}, ValueError, r"'temperature' of 'globalcom2' must be > 0"),
    ("mustdrop", {"window": 0}, ValueError, r"'window' of 'mustdrop' must be in \[1, inf\]"),
    ("fastv", {"layer": True}, TypeError, r"'layer' of 'fastv' must be an int, got True"),
    ("mustdrop_llm", {"mode": "fast"}, ValueError, r"one of \['budget', 'official'\]"),
    ("h2o", {"window": -1}, ValueError, r"'window' of 'h2o' must be in \[0, inf\]"),
    ("atp", {"layers_of_32": "2,8"}, TypeError, r"'layers_of_32' of 'atp' must be a tuple of ints"),
])
def test_bad_option_values_name_the_option_and_what_it_takes(deep, method, options, error, message):
    with pytest.raises(error, match=message):
        compress(deep, budget=0.5, method=method, **options)
    assert not patching.patched_modules(deep)


def test_option_values_of_the_right_type_pass_and_lists_round_trip():
    from vlm_compress import get_method

    atp = get_method("atp").create(layers_of_32=[2, 8], heads=None)
    assert atp.layers_of_32 == (2, 8)
    assert get_method("atp").from_json(atp.to_json()) == atp
    assert get_method("visionzip").create(contextual_ratio=0).contextual_ratio == 0  # an int where a float is asked


def test_atp_refuses_its_default_heads_on_another_model(deep, batch, tmp_path):
    from vlm_compress.pruners.atp import EMBEDDED_HEADS

    with pytest.raises(ValueError, match="trained for the embedded tiny-llava.*heads=None"):
        compress(deep, budget=0.6, method="atp")
    compress(deep, budget=0.6, method="atp", heads=str(EMBEDDED_HEADS))  # passed explicitly: the user's choice
    deep(**batch)


@pytest.mark.parametrize("method", ["cls_attn", "fastv"])
def test_torch_compile_after_compress(model, batch, method):
    """``torch.compile(model)`` after ``compress`` gives the eager compressed outputs (dynamo tracing through the
    per-instance patches; backend ``eager`` keeps the test fast — eval/compile_check.py times inductor)."""
    import torch._dynamo

    if method == "fastv":  # a 2-layer LLM: layer 0 sees every token, layer 1 keeps 20 %
        compress(model, budget=0.6, method=method, layer=1)
    else:
        compress(model, budget=0.25, method=method)
    with torch.no_grad():
        want = model(**batch).logits
    ref = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, want)
    assert torch.equal(compiled.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False), ref)
    torch._dynamo.reset()
