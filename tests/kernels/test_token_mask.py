"""The CPU token-mask kernel against xgrammar's apply_token_bitmask_inplace."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from kernels.cpu.token_mask import _mask, apply_token_bitmask_


@pytest.mark.parametrize("vocab", [49152, 1000, 33, 32])
def test_kernel_equals_xgrammar_apply(vocab: int) -> None:
    assert _mask.load() is not None, _mask.error
    gen = torch.Generator().manual_seed(vocab)
    rows = 6
    bitmask = xgr.allocate_token_bitmask(rows + 2, vocab)
    bitmask.copy_(
        torch.randint(-(2**31), 2**31, bitmask.shape, generator=gen, dtype=torch.int64).to(
            torch.int32
        )
    )
    bitmask[0].zero_()  # nothing allowed
    bitmask[1].fill_(-1)  # everything allowed
    bitmask[2, ::3] = 0  # runs of disallowed words between random ones
    logits = torch.randn(rows, vocab + 7, generator=gen)  # padded past the vocabulary
    indices = [0, 1, 2, 4, 5]
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask[:rows], vocab_size=vocab, indices=indices)
    got = logits.clone()
    apply_token_bitmask_(got, bitmask, indices, vocab)
    assert torch.equal(got, expected)
    assert torch.equal(got[3], logits[3])  # rows not listed are untouched
    assert torch.isinf(got[0, :vocab]).all() and torch.equal(got[1], logits[1])
    assert torch.equal(got[:, vocab:], logits[:, vocab:])  # padding past the vocabulary is kept


def test_rows_out_of_range_are_refused() -> None:
    bitmask = xgr.allocate_token_bitmask(2, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        apply_token_bitmask_(torch.zeros(2, 64), bitmask, [2], 64)
