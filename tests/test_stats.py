"""Cost formulas of vlm_compress.stats against hand counts."""

from types import SimpleNamespace

import pytest

from vlm_compress.stats import decode_flops, kv_cache_bytes, layer_flops, prefill_flops

# d = 8, 2 heads of 4 (d_q = 8), 1 KV head (d_kv = 4), MLP 16, 3 layers, vocabulary 10
CONFIG = SimpleNamespace(hidden_size=8, num_attention_heads=2, head_dim=4, num_key_value_heads=1,
                         intermediate_size=16, num_hidden_layers=3, vocab_size=10)


def test_layer_and_prefill_flops():
    n = 5
    projections = n * 8 * (2 * 8 + 2 * 4)  # q, o and k, v
    attention = 2 * n * n * 8
    mlp = 3 * n * 8 * 16
    assert layer_flops(n, CONFIG) == 2 * (projections + attention + mlp)
    assert prefill_flops([[5, 3, 3], [2, 2, 2]], CONFIG) == sum(layer_flops(k, CONFIG) for k in (5, 3, 3, 2, 2, 2))


def test_decode_flops_shrink_only_in_the_attention_term():
    fixed = 3 * 2 * (8 * (2 * 8 + 2 * 4) + 3 * 8 * 16) + 2 * 8 * 10
    assert decode_flops(0, CONFIG) == fixed
    assert decode_flops(30, CONFIG) - decode_flops(10, CONFIG) == pytest.approx(20 * 4 * 8)


def test_kv_cache_bytes_count_every_layer():
    assert kv_cache_bytes([[5, 3, 3]], CONFIG, element_size=2) == 2 * 11 * 1 * 4 * 2
