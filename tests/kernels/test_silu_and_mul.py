from __future__ import annotations

import pytest
import torch

from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

# bf16 rounds once at the end; the interpreter truncates float32 -> bf16 where a GPU rounds to
# nearest, so allow one bf16 ulp (2**-7 relative).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 64), (9, 100), (3, 1536)])
def test_matches_reference(device, dtype, num_tokens, intermediate):
    gen = torch.Generator().manual_seed(0)
    # x: [num_tokens, 2 * intermediate], a strided view as the executor may pass
    x = 3 * torch.randn(num_tokens, 2 * intermediate + 8, generator=gen)
    x = x.to(dtype).to(device)[:, : 2 * intermediate]

    out = silu_and_mul(x)

    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_ref(x), **TOLERANCES[dtype])


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(4, 7),  # odd width
        torch.randn(2, 4, 8),  # 3-D
        torch.randn(4, 8).long(),  # integer
        torch.randn(8, 4).t(),  # strided last dim
    ],
    ids=["odd-width", "3d", "integer", "strided"],
)
def test_rejects_bad_inputs(device, x):
    with pytest.raises(ValueError):
        silu_and_mul(x.to(device))
