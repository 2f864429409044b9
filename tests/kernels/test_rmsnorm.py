from __future__ import annotations

import pytest
import torch

from kernels.rmsnorm import rmsnorm, rmsnorm_ref

# bf16 rounds twice (normed, then times weight, as HF does) and the interpreter truncates
# float32 -> bf16 where a GPU rounds to nearest: allow up to ~3 bf16 ulps (2**-7 relative each).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=3e-2)}
EPS = 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("num_tokens", "hidden"), [(1, 64), (7, 576), (3, 1000)])
def test_matches_reference(device, dtype, with_residual, num_tokens, hidden):
    gen = torch.Generator().manual_seed(0)
    # x: [num_tokens, hidden], a strided view as the executor may pass
    x = torch.randn(num_tokens, 2 * hidden, generator=gen).to(dtype).to(device)[:, :hidden]
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    residual_ref = residual.clone()

    out = rmsnorm(x, weight, EPS, residual if with_residual else None)
    expected = rmsnorm_ref(x, weight, EPS, residual_ref if with_residual else None)

    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(residual, residual_ref, **TOLERANCES[dtype])


def _valid_inputs(device: str) -> dict:
    return dict(
        x=torch.randn(3, 64, device=device),
        weight=torch.ones(64, device=device),
        eps=EPS,
        residual=torch.randn(3, 64, device=device),
    )


BAD_INPUTS = {
    "x-3d": lambda a: a.update(x=a["x"][None]),
    "weight-wrong-size": lambda a: a.update(weight=a["weight"][:32]),
    "residual-wrong-shape": lambda a: a.update(residual=a["residual"][:2]),
    "dtype-mismatch": lambda a: a.update(weight=a["weight"].bfloat16()),
    "integer-x": lambda a: a.update(
        x=a["x"].long(), weight=a["weight"].long(), residual=a["residual"].long()
    ),
    "strided-rows": lambda a: a.update(x=a["x"].t().contiguous().t()),
    "other-device": lambda a: a.update(weight=a["weight"].to("meta")),
}


@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(device, corrupt):
    args = _valid_inputs(device)
    corrupt(args)
    with pytest.raises(ValueError):
        rmsnorm(**args)
