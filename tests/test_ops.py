import pytest
import torch

from vlm_compress.ops import gather_tokens, merge_into_targets, pool_grid, row_attention, topk_indices


def test_topk_sorted_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_indices(scores, 2).tolist() == [[1, 3], [0, 1]]
    assert topk_indices(scores, 0).shape == (2, 0)
    assert topk_indices(scores, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError):
        topk_indices(scores, 6)


def test_topk_matches_sorted_torch_topk_without_ties():
    scores = torch.randn(4, 37)
    for k in (1, 5, 37):
        assert torch.equal(topk_indices(scores, k), scores.topk(k).indices.sort().values)


def test_gather_tokens():
    x = torch.arange(24.0).view(2, 4, 3)
    out = gather_tokens(x, torch.tensor([[0, 3], [1, 2]]))
    assert torch.equal(out, torch.stack([x[0, [0, 3]], x[1, [1, 2]]]))


def test_row_attention_against_full_softmax():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 10, 4, 8)
    full = (torch.einsum("brhd,bnhd->bhrn", q, k) * 0.3).softmax(-1)
    torch.testing.assert_close(row_attention(q, k, 0.3, "mean"), full.mean(1))
    torch.testing.assert_close(row_attention(q, k, 0.3, "sum"), full.sum(1))
    torch.testing.assert_close(row_attention(q, k, 0.3, "max", "logits"), (torch.einsum("brhd,bnhd->bhrn", q, k) * 0.3).amax(1))
    with pytest.raises(ValueError):
        row_attention(q, k, 0.3, "median")


def test_pool_grid_identity_and_shape():
    x = torch.randn(2, 12, 5)
    assert pool_grid(x, (3, 4), (3, 4)) is x
    assert pool_grid(x, (3, 4), (1, 2)).shape == (2, 2, 5)
    torch.testing.assert_close(pool_grid(x, (3, 4), (1, 1))[:, 0], x.mean(1))


def test_merge_into_targets_each_target_keeps_itself():
    x = torch.randn(1, 5, 3)
    metric = torch.eye(5).unsqueeze(0)  # orthogonal: ties → argmax picks first target
    merged, assignment = merge_into_targets(x, metric, torch.tensor([[1, 3]]))
    assert assignment.tolist() == [[0, 0, 0, 1, 0]]
    torch.testing.assert_close(merged[0, 0], x[0, 1] + x[0, [0, 2, 4]].mean(0))
    torch.testing.assert_close(merged[0, 1], x[0, 3])
