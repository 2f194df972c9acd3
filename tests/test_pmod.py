"""p-MoD: schedule, TanhNorm/STRing, routing inside the token-plan engine, weight deltas."""

import math

import pytest
import torch
from conftest import assert_batch_equals_single

from vlm_compress import compat, compress
from vlm_compress.config import MethodConfig
from vlm_compress.modules.pmod import (
    TokenRouters, load_pmod_model, router_factor_for, save_deltas, shifted_cos_ratios, tanh_norm,
)
from vlm_compress.pruners.pmod import PModPruner
from vlm_compress.testing import LlavaDims, build_llava

LAYERS = 4
N = 16  # visual tokens per image of the test model


@pytest.fixture()
def deep(tokenizer):
    return build_llava(tokenizer, LlavaDims(text_layers=LAYERS))


def make_routers(path, hidden=32, layers=range(LAYERS), seed=None):
    routers = TokenRouters(hidden, list(layers))
    if seed is not None:  # a trained-looking router: distinct scores per token
        generator = torch.Generator().manual_seed(seed)
        for router in routers.routers.values():
            router.weight.data = torch.randn(router.weight.shape, generator=generator)
    routers.save(path)
    return str(path)


def test_schedule_for_32_layers_matches_the_official_table():
    ratios = shifted_cos_ratios(32)  # R̄ = 0.5, max 0.85, min 0.15
    assert ratios[:8] == [1.0] * 8  # dense layers
    table = {8: .8445, 10: .7645, 12: .6737, 14: .5757, 16: .4747, 18: .3747, 20: .2798, 22: .1939, 23: .1555}
    for layer, value in table.items():
        assert ratios[layer] == pytest.approx(value, abs=5e-5)
    assert ratios[24:] == [0.15] * 8
    assert sum(ratios) / 32 == pytest.approx(0.537, abs=1e-3)  # the paper's 53.8 % KV (reference §1.3)


def test_schedule_generalises_to_the_model_depth():
    # L = 4: cos(l·π/3)/2 + 0.5 → 1.0 (dense), 0.75, 0.25, 0.0 → clamped to 0.15
    assert shifted_cos_ratios(4) == pytest.approx([1.0, 0.75, 0.25, 0.15])
    average = sum(shifted_cos_ratios(32)) / 32
    assert router_factor_for(average, 32) == pytest.approx(0.5, abs=1e-6)
    for budget in (0.3, 0.5, 0.8):
        factor = router_factor_for(budget, 4)
        assert sum(shifted_cos_ratios(4, factor)) / 4 <= budget + 1e-9


def test_tanh_norm_is_one_for_a_zero_router_and_bounded():
    assert torch.equal(tanh_norm(torch.zeros(3)), torch.ones(3))
    w = tanh_norm(torch.tensor([-50.0, 50.0]))
    assert w.tolist() == pytest.approx([0.8, 1.2])


def test_ratio_one_with_zero_routers_is_exact(deep, batch, tmp_path):
    reference = deep(**batch).logits
    ref_tokens = deep.generate(**batch, max_new_tokens=3, do_sample=False)
    compress(deep, method=PModPruner(routers=make_routers(tmp_path), ratios=(1.0,) * LAYERS))
    assert torch.equal(deep(**batch).logits, reference)
    assert torch.equal(deep.generate(**batch, max_new_tokens=3, do_sample=False), ref_tokens)


def test_each_layer_caches_text_plus_trunc_of_its_ratio(deep, batch, tmp_path):
    ratios = (None, 0.75, 0.3, 0.15)
    compress(deep, method=PModPruner(routers=make_routers(tmp_path, seed=0), ratios=ratios))
    deep(**batch, use_cache=True)
    slots = deep.compression.prefill.slots
    valid = batch["attention_mask"].sum(dim=1)
    for layer, ratio in enumerate(ratios):
        kept = N if ratio is None else math.floor(N * ratio)
        assert slots.cached_tokens(layer).tolist() == (valid - N + kept).tolist()
    stats = deep.compression.stats
    assert stats.layer_visual_tokens == [16.0, 12.0, 4.0, 2.0]
    assert stats.kv_cache_bytes < stats.kv_cache_bytes_full


def test_routing_is_not_monotone_and_skipped_tokens_are_scaled_by_their_weight(deep, batch, tmp_path):
    path = make_routers(tmp_path, seed=1)
    compress(deep, method=PModPruner(routers=path, ratios=(None, 0.5, None, 0.5)))
    captured = {}
    layers = deep.model.language_model.layers

    def keep(i):
        def hook(module, args, kwargs, output):
            captured[i] = (kwargs.get("hidden_states", args[0] if args else None), output)
        return hook

    handles = [layers[i].register_forward_hook(keep(i), with_kwargs=True) for i in (1, 3)]
    deep(**batch)
    for h in handles:
        h.remove()
    visual = batch["input_ids"] == deep.config.image_token_id
    routers = TokenRouters.load(path)
    chosen = []
    for i in (1, 3):
        x, out = captured[i]
        out = out[0] if isinstance(out, tuple) else out
        logits = routers(i, x)
        w = tanh_norm(logits)
        # top-8 of the router logits among the visual tokens, per sample
        top = logits.masked_fill(~visual, -torch.inf).topk(N // 2, dim=1).indices
        kept = torch.zeros_like(visual).scatter_(1, top, True)
        skipped = visual & ~kept
        torch.testing.assert_close(out[skipped], (w[..., None] * x)[skipped])
        assert not torch.allclose(out[kept], (w[..., None] * x)[kept])
        chosen.append(kept)
    assert not torch.equal(chosen[0], chosen[1])  # layer 3 routes its own set: the plan is not monotone


def test_router_gets_gradient_from_skipped_tokens(deep, batch, tmp_path):
    path = make_routers(tmp_path, seed=2)
    config = PModPruner(routers=path, ratios=(None, 0.0, None, None))  # layer 1 skips every visual token
    compress(deep, method=config)
    routers = config.module()
    routers.zero_grad()
    deep(**batch).logits[:, -1].sum().backward()
    grad = routers.routers["1"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_cached_decode_equals_full_recompute(deep, batch, tmp_path):
    # routing depends only on the prompt's causal hidden states, so a full recompute routes the same way
    compress(deep, method=PModPruner(routers=make_routers(tmp_path, seed=3), ratios=(None, 0.5, 0.25, 0.25)))
    out = deep(**batch, use_cache=True)
    ids, mask, cache = batch["input_ids"], batch["attention_mask"], compat.cache_of_output(out)
    for _ in range(3):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        out = deep(input_ids=token, attention_mask=mask, use_cache=True, **{compat.CACHE_ARGUMENT: cache})
    full = deep(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False)
    torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)


def test_batch_equals_single(deep, processor, images, batch, tmp_path):
    compress(deep, method=PModPruner(routers=make_routers(tmp_path, seed=4), ratios=(None, 0.5, 0.25, 0.25)))
    assert_batch_equals_single(deep, processor, images, batch)


def test_budget_solves_the_schedule(deep, batch, tmp_path):
    compress(deep, budget=0.5, method=PModPruner(routers=make_routers(tmp_path, seed=5)))
    deep(**batch)
    average = deep.compression.stats.layer_avg_visual_tokens / N
    assert average <= 0.5 and average > 0.4


def test_bad_configurations_name_the_fix(deep, tmp_path):
    only_last = make_routers(tmp_path / "last", layers=[3])
    with pytest.raises(ValueError, match="missing"):
        compress(deep, budget=0.5, method=PModPruner(routers=only_last))
    with pytest.raises(ValueError, match="32-d"):
        compress(deep, budget=0.5, method=PModPruner(routers=make_routers(tmp_path / "wide", hidden=48)))
    with pytest.raises(ValueError, match="min_ratio"):
        compress(deep, budget=0.1, method=PModPruner(routers=make_routers(tmp_path / "all")))
    with pytest.raises(ValueError, match="no p-MoD routers"):
        compress(deep, budget=0.5, method=PModPruner(routers=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="ratios"):
        PModPruner(ratios=(0.5, 2.0))
    assert not hasattr(deep, "compression") or deep.compression is None


def test_config_round_trips_through_json(tmp_path):
    config = PModPruner(budget=0.5, routers=str(tmp_path), ratios=(None, 0.5, 0.25, 0.15))
    assert MethodConfig.from_json(config.to_json()) == config


def test_weight_deltas_restore_the_fine_tuned_model(tokenizer, tmp_path):
    base = build_llava(tokenizer, LlavaDims(text_layers=2))
    base.save_pretrained(tmp_path / "base")
    tuned = build_llava(tokenizer, LlavaDims(text_layers=2))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.model.language_model.layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "pmod"
    TokenRouters(32, [1]).save(out, base="../base")
    save_deltas(tuned, base, out)
    loaded = load_pmod_model(out)
    for (name, p), q in zip(tuned.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=0, msg=name)


def test_int_budget_above_the_token_count_is_dense(deep, batch, tmp_path):
    reference = deep(**batch).logits
    compress(deep, budget=10 * N, method=PModPruner(routers=make_routers(tmp_path, seed=6)))
    assert torch.equal(deep(**batch).logits, reference)
    assert deep.compression.stats.layer_visual_tokens == [N] * LAYERS
