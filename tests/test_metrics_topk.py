"""The block-prefiltered top-k of the vocabulary-wide metrics against torch.topk."""

from __future__ import annotations

import pytest
import torch

from neuron_effects.metrics import TOP_K_BLOCK, top_k_columns


@pytest.mark.parametrize("width", [64 * 768, 64 * 40, 64 * 40 + 3, 101])
def test_top_k_columns_equals_topk(width):
    generator = torch.Generator().manual_seed(width)
    values = torch.randn(16, width, generator=generator).abs()
    values[3, :] = 0.0  # an all-zero row: any 10 columns, values 0
    if width > 8 * TOP_K_BLOCK:  # the whole top 10 in one block
        values[5, 7 * TOP_K_BLOCK: 7 * TOP_K_BLOCK + 10] = 50.0 + torch.arange(10.0)
    top, columns = top_k_columns(values, 10)
    expected, expected_columns = values.topk(10, dim=-1)
    assert torch.equal(top, expected)
    assert torch.equal(values.gather(1, columns), top)
    distinct = torch.arange(16) != 3
    assert torch.equal(columns[distinct], expected_columns[distinct])


def test_top_k_columns_keeps_tied_values():
    values = torch.zeros(2, 64 * 50)
    values[:, ::97] = 1.0  # 33 tied maxima spread over many blocks
    top, columns = top_k_columns(values, 10)
    assert torch.equal(top, torch.ones(2, 10))
    assert (values.gather(1, columns) == 1.0).all() and columns.unique(dim=1).shape[1] == 10
