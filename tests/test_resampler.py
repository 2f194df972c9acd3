"""The MQT resampler: nested outputs, content-independent attention, save/load."""

import pytest
import torch

from vlm_compress.modules.resampler import QueryResampler, ResamplerConfig, sincos_2d


@pytest.fixture()
def resampler():
    torch.manual_seed(0)
    return QueryResampler(ResamplerConfig(num_queries=16, kv_dim=32, embed_dim=24, num_heads=4)).eval()


def test_any_prefix_of_the_queries_is_the_same_output(resampler):
    x = torch.randn(2, 36, 32)  # a 6×6 patch grid
    full = resampler(x, 16)
    assert full.shape == (2, 16, 24)
    for m in (1, 4, 9):
        torch.testing.assert_close(resampler(x, m), full[:, :m])


def test_attention_ignores_content_as_in_the_official_keys(resampler):
    _, w1 = resampler(torch.randn(1, 36, 32), 16, return_weights=True)
    _, w2 = resampler(torch.randn(1, 36, 32), 16, return_weights=True)
    torch.testing.assert_close(w1, w2)  # keys are positions only


def test_sincos_rows_and_columns():
    pos = sincos_2d(8, 2, 3)
    assert pos.shape == (6, 8)
    # first half: the column (cells 0 and 3 share column 0); second half: the row (cells 0 and 2 share row 0)
    assert torch.equal(pos[0, :4], pos[3, :4]) and not torch.equal(pos[0, :4], pos[1, :4])
    assert torch.equal(pos[0, 4:], pos[2, 4:]) and not torch.equal(pos[0, 4:], pos[3, 4:])


def test_save_load_round_trip_and_errors(resampler, tmp_path):
    resampler.save(tmp_path / "r")
    again = QueryResampler.load(tmp_path / "r")
    x = torch.randn(1, 36, 32)
    torch.testing.assert_close(again(x, 5), resampler(x, 5))
    with pytest.raises(ValueError, match="m must be"):
        resampler(x, 17)
    with pytest.raises(ValueError, match="square"):
        ResamplerConfig(num_queries=10)
    with pytest.raises(ValueError, match="no resampler"):
        QueryResampler.load(tmp_path)
