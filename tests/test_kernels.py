"""Every Triton kernel equals its torch reference under TRITON_INTERPRET=1 (CPU tensors); the dispatch's rules."""

import os

import pytest
import torch

from vlm_compress import kernels

import triton  # noqa: E402,F401  (the test extra installs it; a missing triton must fail, not skip)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture()
def triton_backend(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it before any kernel module is imported
    monkeypatch.setenv(kernels.ENV, "triton")


def both(fn, *args, **kwargs):
    """(reference result, kernel result) of a dispatch function."""
    os.environ[kernels.ENV] = "torch"
    expected = fn(*args, **kwargs)
    os.environ[kernels.ENV] = "triton"
    return expected, fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gather_matches_reference_with_ragged_groups_and_ties(triton_backend, dtype):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 37), generator=g).to(dtype)  # many ties
    features = torch.randn(3, 37, 19, generator=g).to(dtype)
    sizes = torch.tensor([[20, 17, 0], [7, 7, 7], [37, 0, 0]])
    k = torch.tensor([[0, 17, 0], [1, 3, 9], [5, 0, 0]])  # k = 0, k = N of a group, k > group size
    (ref_out, ref_index, ref_counts), (out, index, counts) = both(kernels.topk_gather, scores, features, k, sizes)
    assert torch.equal(index, ref_index) and torch.equal(counts, ref_counts) and torch.equal(out, ref_out)
    assert counts.tolist() == [17, 1 + 3 + 7, 5]


def test_topk_gather_breaks_ties_to_the_lower_index_and_keeps_order(triton_backend):
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -1.0, 0.5]])
    features = torch.arange(7.0).view(1, 7, 1)
    out, index, counts = kernels.topk_gather(scores, features, 2)
    assert index.tolist() == [[1, 2]] and out[0, :, 0].tolist() == [1.0, 2.0]
    _, index, _ = kernels.topk_gather(scores, features, 7)
    assert index.tolist() == [list(range(7))]
    _, index, counts = kernels.topk_gather(scores, features, 0)
    assert index.shape == (1, 0) and counts.tolist() == [0]
    _, index, _ = kernels.topk_gather(-scores, features, 3)  # negative values order correctly too
    assert index.tolist() == [[0, 5, 6]]


@pytest.mark.parametrize("n", [1, 33, 130])
def test_topk_gather_random_shapes(triton_backend, n):
    g = torch.Generator().manual_seed(n)
    scores, features = torch.randn(2, n, generator=g), torch.randn(2, n, 5, generator=g)
    for k in {0, 1, n // 3, n}:
        expected, got = both(kernels.topk_gather, scores, features, k)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_row_attention_matches_reference(triton_backend, dtype, reduce, kind):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 12, generator=g).to(dtype)  # 4 query heads over 2 KV heads, head_dim 12
    k = torch.randn(2, 2, 150, 12, generator=g).to(dtype)  # N not a power of two, > one key block
    allowed = torch.rand(2, 3, 150, generator=g) > 0.3
    allowed[1, 2] = False  # a row with no allowed key
    for mask in (None, allowed):
        expected, got = both(kernels.row_attention, q, k, 12 ** -0.5, reduce, kind, mask)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-5)


def test_row_attention_reference_in_chunks_equals_the_plain_formula(monkeypatch):
    """The reference goes through rows in chunks (cache-sized passes); any chunking gives the per-head softmax of
    q·Kᵀ·scale, masked, reduced over heads — written out here in one piece."""
    from vlm_compress.kernels import reference

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 21, 8, generator=g)
    allowed = torch.rand(2, 9, 21, generator=g) > 0.4
    allowed[0, 4] = False
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8 ** -0.5
    expected = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0).mean(1)
    for chunk in (1, 2 * 4 * 21 * 3, 2**20):  # one row per chunk, three rows (a ragged last chunk), everything at once
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
        torch.testing.assert_close(reference.row_attention(q, k, 8 ** -0.5, "mean", "probs", allowed), expected)
    assert reference.row_attention(q[:, :, :0], k, 1.0).shape == (2, 0, 21)


def test_row_attention_stops_at_the_last_key_a_chunk_may_see(monkeypatch):
    """Under a causal mask a chunk of early rows multiplies only the keys its rows may see; the keys after them are
    exactly 0 (probs) or -inf (logits), the rest as over all keys."""
    from vlm_compress.kernels import reference

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    causal = torch.ones(12, 12).tril().bool().expand(2, 12, 12).clone()
    causal[1, 3] = False  # a blind row in an early chunk
    logits = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8 ** -0.5
    masked = logits.masked_fill(~causal[:, None], float("-inf"))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 4 * 12 * 4)  # chunks of 4 rows: reach 4, 8, 12 keys
    assert reference._key_reach(causal, 4) == [4, 8, 12]
    probs = reference.row_attention(q, k, 8 ** -0.5, "mean", "probs", causal)
    torch.testing.assert_close(probs, torch.softmax(masked, dim=-1).nan_to_num(0.0).mean(1))
    logits_max = reference.row_attention(q, k, 8 ** -0.5, "max", "logits", causal)
    assert torch.equal(torch.isinf(logits_max), torch.isinf(masked.amax(1)))  # -inf exactly where no key is allowed
    torch.testing.assert_close(logits_max, masked.amax(1))


@pytest.mark.parametrize("chunk", [2 * 4 * 21, 2 * 4 * 21 * 3, 2**20])
def test_row_attention_received_is_the_weighted_sum_of_the_rows(triton_backend, monkeypatch, chunk):
    """Σ_r w[g, r] · A[r] for head-mean probabilities A, computed without forming A, with grouped-query heads, a
    causal mask with padding and a blind row (weight 0), in any chunking."""
    from vlm_compress.kernels import reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 21, 8, generator=g)
    allowed = torch.ones(21, 21).tril().bool()[-9:].expand(2, 9, 21).clone()
    allowed[0, :, :3] = False  # left padding of sample 0
    allowed[1, 5] = False
    weights = (torch.rand(2, 3, 9, generator=g) > 0.5).float()
    weights[1, :, 5] = 0.0
    rows = kernels.row_attention(q, k, 0.3, "mean", "probs", allowed)  # [B, R, N], the Triton kernel
    for backend in ("torch", "triton"):  # the fused reference, and the kernel's rows contracted afterwards
        monkeypatch.setenv(kernels.ENV, backend)
        got = kernels.row_attention_received(q, k, 0.3, allowed, weights)
        torch.testing.assert_close(got, torch.bmm(weights, rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_merge_matches_reference(triton_backend, dtype):
    g = torch.Generator().manual_seed(2)
    values = torch.randn(2, 36, 10, generator=g).to(dtype)
    metric = torch.randn(2, 36, 40, generator=g).to(dtype)
    metric[0, :3] = metric[0, 0]  # one window whose first row repeats: higher similarity
    windows = kernels.grid_windows(6, 6, 3).expand(2, -1, -1).clone()
    windows[1, 2] = -1  # an absent window
    sizes = torch.rand(2, 36, generator=g) + 0.5
    for threshold in (-1.0, 0.0, 0.2):
        (ref_merged, ref_sim, ref_mean), (merged, sim, mean) = both(kernels.window_merge, values, metric, windows,
                                                                    threshold, sizes)
        torch.testing.assert_close(sim, ref_sim, rtol=1e-4, atol=1e-5)
        assert torch.equal(merged, ref_merged)
        torch.testing.assert_close(mean.float(), ref_mean.float(), rtol=1e-2, atol=1e-2)
    assert not merged[1, 2] and sim[1, 2] == 0


def test_window_merge_formula_on_a_hand_built_window():
    values = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    merged, sim, mean = kernels.window_merge(values, metric, torch.tensor([[0, 1, 2, 3]]), 0.5,
                                             sizes=torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    # pairs: (0,1) 1, (0,2) 0, (0,3) .7071, (1,2) 0, (1,3) .7071, (2,3) .7071 → mean 3.1213/6 = 0.5202
    assert sim.item() == pytest.approx((1 + 3 * 2 ** -0.5) / 6, abs=1e-6) and merged.item()
    assert mean.item() == pytest.approx((1 + 3 + 2 * 5) / 4)


def test_grid_windows_are_complete_raster_windows():
    w = kernels.grid_windows(4, 5, 2)  # a 4×5 grid: 2×2 complete windows, the last column left out
    assert w.tolist() == [[0, 1, 5, 6], [2, 3, 7, 8], [10, 11, 15, 16], [12, 13, 17, 18]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_best_match_and_bipartite_merge_match_reference(triton_backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 45, 8, generator=g).to(dtype)
    metric = torch.randn(2, 45, 20, generator=g).to(dtype)
    (ref_sim, ref_index), (sim, index) = both(kernels.best_match, metric[:, ::2], metric[:, 1::2])
    torch.testing.assert_close(sim, ref_sim, rtol=1e-4, atol=1e-4)
    assert torch.equal(index, ref_index)
    for r in (0, 1, 10, 23):
        expected, got = both(kernels.bipartite_merge, x, metric, r)
        assert torch.equal(got[2], expected[2]) and torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0].float(), expected[0].float(), rtol=1e-2, atol=1e-2)


def test_bipartite_merge_formula_by_hand():
    x = torch.tensor([[[1.0], [10.0], [2.0], [20.0]]])  # A = tokens 0, 2; B = tokens 1, 3
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]]])  # 2 ≡ 3, 0 ≈ 1
    merged, sizes, source = kernels.bipartite_merge(x, metric, 1, sizes=torch.tensor([[1.0, 1.0, 1.0, 3.0]]))
    assert source.tolist() == [[0, 1, 2, 2]]  # token 2 (the best edge) went into token 3
    assert merged[0, :, 0].tolist() == pytest.approx([1.0, 10.0, (2 + 60) / 4])
    assert sizes.tolist() == [[1.0, 1.0, 4.0]]


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.backend(cpu) == "torch"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.backend(cpu) == "torch"
    monkeypatch.setenv(kernels.ENV, "triton")
    assert kernels.backend(cpu) == "triton"  # the interpreter is on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend(cpu)
    monkeypatch.setenv(kernels.ENV, "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        kernels.backend(cpu)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="scores \\[B, N\\]"):
        kernels.topk_gather(torch.zeros(3), torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="sum to at most"):
        kernels.topk_gather(torch.zeros(1, 4), torch.zeros(1, 4, 2), 1, group_sizes=[3, 3])
    with pytest.raises(ValueError, match="multiple of H_kv"):
        kernels.row_attention(torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, 5, 4), 1.0)
    with pytest.raises(ValueError, match="reduce must be"):
        kernels.row_attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 5, 4), 1.0, reduce="median")


@pytest.mark.parametrize("method", ["cls_attn", "mustdrop", "fastv:layer=1"])
def test_methods_give_the_same_results_through_the_kernels(monkeypatch, model, batch, method):
    from vlm_compress import compress, restore
    from vlm_compress.bench.run import method_arg

    results = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV, choice)
        name, options = method_arg(method, 0.75)  # the test LLM has 2 layers: FastV at K=1 reaches 0.5 minimum
        compress(model, method=name, **options)
        results[choice] = (model(**batch).logits, model.compression.stats.kept_per_image)
        restore(model)
    assert results["torch"][1] == results["triton"][1]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-4)
