"""The vLLM plugin's engine-free parts: eligibility, the shared count, export, MustDrop's fixed count, fused-qkv hooks.

The engine itself is tested in ``tests_vllm/`` (``make test-vllm``, its own venv)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlm_compress import compress, restore
from vlm_compress.integrations import vllm as plugin
from vlm_compress.pruners.base import kept_count
from vlm_compress.scoring import AttentionCapture


def test_eligible_methods_resolve_and_mustdrop_gets_a_fixed_count():
    for name in plugin.ELIGIBLE:
        pruner = plugin.pruner_from_spec({"method": name, "budget": 0.2})
        assert pruner.name == name and pruner.exact_count()
    assert plugin.pruner_from_spec({"method": "mustdrop", "budget": 0.2}).fixed_count


@pytest.mark.parametrize("spec, message", [
    ({"method": "cls_atn", "budget": 0.2}, "Did you mean 'cls_attn'"),
    ({"method": "fastv", "budget": 0.2}, "prefill-stage method"),
    ({"method": "h2o", "budget": 0.2}, "decode-stage method"),
    ({"method": "cdpruner", "budget": 0.2}, "instruction"),
    ({"method": "cls_attn", "budget": "auto"}, "float or int budget"),
    ({"method": "mustdrop", "budget": 0.2, "options": {"fixed_count": False}}, "fixed_count=True"),
    ("cls_attn", "must be a dict"),
])
def test_ineligible_specs_name_the_fix(spec, message):
    with pytest.raises(ValueError) as caught:
        plugin.pruner_from_spec(spec)
    assert message in str(caught.value)
    if isinstance(spec, dict) and spec["method"] not in ("cls_atn", "cls_attn", "mustdrop"):
        assert "cls_attn" in str(caught.value)


def test_kept_count_is_what_the_hf_stage_keeps(model, batch):
    from vlm_compress.adapters import get_adapter

    for method in ("cls_attn", "pool", "visionzip"):
        compress(model, 0.3, method)
        model(**batch)
        stats = model.compression.stats
        pruner = model.compression.configs[0]
        layout = get_adapter(model).encode_images(batch["pixel_values"][:1])[0].layout
        assert stats.kept_per_image == [kept_count(pruner, layout)] * 3
        restore(model)
    with pytest.raises(ValueError, match="known only after encoding"):
        kept_count(plugin.pruner_from_spec({"method": "cls_attn", "budget": 0.2}).__class__.create(budget="auto:0.9"),
                   layout)


def test_mustdrop_fixed_count_keeps_exactly_the_budget(model, batch):
    # threshold -1 merges every window: the adaptive form then ends below the budget, the fixed form exactly on it
    compress(model, 0.9, "mustdrop", threshold=-1.0)
    model(**batch)
    adaptive = model.compression.stats.kept_per_image
    restore(model)
    compress(model, 0.9, "mustdrop", threshold=-1.0, fixed_count=True)
    model(**batch)
    fixed = model.compression.stats.kept_per_image
    budget = kept_count(model.compression.configs[0], get_layout(model, batch))
    restore(model)
    assert max(adaptive) < budget and fixed == [budget] * 3


def get_layout(model, batch):
    from vlm_compress.adapters import get_adapter

    return get_adapter(model).encode_images(batch["pixel_values"][:1])[0].layout


def test_export_writes_the_architecture_the_spec_and_vllm_tower_keys(tmp_path, model):
    src = tmp_path / "src"
    model.save_pretrained(src)
    keys = set(load_file(src / "model.safetensors"))
    assert any(plugin.TOWER_KEY.match(k) for k in keys)  # transformers 5.x names the tower without vision_model.
    out = plugin.export_vllm(src, tmp_path / "dst", "hired", 0.25)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["VlmCompressLlavaForConditionalGeneration"]
    assert config["vlm_compress"] == {"method": "hired", "budget": 0.25, "options": {}}
    exported = load_file(out / "model.safetensors")
    assert {plugin.TOWER_KEY.sub(r"\1vision_model.", k) for k in keys} == set(exported)
    assert all(".vision_model." in f".{k}" for k in exported if "vision_tower" in k)
    assert plugin.vllm_overrides(out, "cls_attn", 64)["vlm_compress"]["budget"] == 64
    with pytest.raises(ValueError, match="other than SRC"):
        plugin.export_vllm(src, src, "cls_attn", 0.2)


def test_export_command_reports_bad_methods(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(SystemExit) as caught:
        plugin.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--method", "atp", "--budget", "0.2"])
    assert caught.value.code == 2
    assert "cls_attn" in capsys.readouterr().err
    plugin.main([str(tmp_path / "src"), str(tmp_path / "ok"), "--method", "cls_attn", "--budget", "32",
                 "--option", "layer=-3"])
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["vlm_compress"]["options"] == {"layer": -3}


class _Fused(nn.Module):
    """vLLM-style attention: one ``qkv_proj`` returning ``(output, bias)``."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, heads: int):
        super().__init__()
        self.linear = nn.Linear(q.in_features, 3 * q.out_features)
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.linear.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.qkv_proj = _TupleOut(self.linear)
        self.num_heads, self.head_dim = heads, q.out_features // heads
        self.scale = self.head_dim ** -0.5

    def forward(self, x):
        return self.qkv_proj(x)[0]


class _TupleOut(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x), None


class _Split(nn.Module):
    def __init__(self, q, k, heads):
        super().__init__()
        self.q_proj, self.k_proj = q, k
        self.num_heads, self.head_dim = heads, q.out_features // heads
        self.scale = self.head_dim ** -0.5

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x)


@pytest.mark.parametrize("all_rows", [False, True])
def test_fused_qkv_hooks_give_the_rows_of_separate_projections(all_rows):
    torch.manual_seed(0)
    q, k, v = (nn.Linear(16, 16) for _ in range(3))
    x = torch.randn(2, 7, 16)
    split, fused = _Split(q, k, heads=4), _Fused(q, k, v, heads=4)
    with AttentionCapture({0: split}, all_query_rows=all_rows) as a:
        split(x)
    with AttentionCapture({0: fused}, all_query_rows=all_rows) as b:
        fused(x)
    torch.testing.assert_close(a.first_row_attention(0), b.first_row_attention(0))
    torch.testing.assert_close(a.keys[0], b.keys[0])
    assert a.queries[0].shape == b.queries[0].shape == (2, 7 if all_rows else 1, 16)
