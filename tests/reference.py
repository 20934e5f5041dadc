"""Plain-PyTorch float32 references and the tolerances the ops are held to.

References take the (already rounded) low-precision inputs, upcast them and do
every step in float32, or float64 where float32 itself would be the error under
test. The kernels also compute in float32 and round once to the output dtype.
"""
import torch

# Unit roundoff of each dtype: half the gap between 1 and the next number.
UNIT_ROUNDOFF = {d: torch.finfo(d).eps / 2 for d in (torch.float32, torch.float16, torch.bfloat16)}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """rtol/atol for an output rounded once from float32 math.

    A kernel output is round(v + d), where v is the exact float32 reference and
    d the difference that another summation order makes (a few float32 ulps of
    the terms). |round(v + d) - v| <= u|v| + (1 + u)|d|. We allow 2u relative,
    which also covers values sitting on a rounding boundary, plus an absolute
    1e-5 of the tensor's scale for d near zero-valued outputs. float32 outputs
    get 1e-5 relative: summing 4096 terms in another order moves the result by
    up to ~sqrt(4096) * 2^-24 ~ 4e-6 relative.
    """
    rtol = 1e-5 if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype]
    return dict(rtol=rtol, atol=1e-5 * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "",
                 scale: float | None = None) -> None:
    """`scale` is the magnitude of the terms that were summed; it defaults to
    the largest |expected|, but a result that cancels to near zero (a norm's
    input gradient) must pass the size of its terms instead."""
    expected = expected.float()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected, **tolerance(dtype, scale), msg=lambda m: f"{name}: {m}")


def rms_norm(x, weight, eps):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def norm_grad_scale(x, dy, weight=None, eps=1e-5, centered=False) -> float:
    """Largest rstd * |dy * weight|: the size of the terms of a norm's dx."""
    x32 = x.float() - (x.float().mean(-1, keepdim=True) if centered else 0)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    g = dy.float() * (weight.float() if weight is not None else 1)
    return (rstd * g.abs()).max().item() if g.numel() else 1.0


def layer_norm(x, eps):
    return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)


def rope_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """theta^(-2i/D) in float64, rounded once to float32 (the kernels' rule)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64)
    return (1.0 / theta ** (i / head_dim)).float()


def rope(x, positions, theta, interleaved, inv_freq=None, attention_factor=1.0):
    """x (..., S, H, D) rotated by positions broadcast to (..., S).

    Written independently of the kernels: the angle is float32(position) times
    the float32 frequency, rounded in float32, and its cos/sin are evaluated
    in float64 so that only the float32 angle rule is shared with the kernels.
    inv_freq: a scaled-RoPE frequency table (D/2,) in place of theta^(-2i/D);
    attention_factor multiplies cos and sin (YaRN).
    """
    d = x.shape[-1]
    pos = positions.expand(x.shape[:-2]).float()
    freq = rope_inv_freq(theta, d) if inv_freq is None else inv_freq.float().cpu()
    angle = pos[..., None, None] * freq.to(x.device)  # (..., S, 1, D/2), float32
    cos = (torch.cos(angle.double()) * attention_factor).float()
    sin = (torch.sin(angle.double()) * attention_factor).float()
    x32 = x.float()
    if interleaved:
        x0, x1 = x32[..., 0::2], x32[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
        return out.flatten(-2)
    x0, x1 = x32[..., : d // 2], x32[..., d // 2:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


def interleaved_to_half_split(head_dim: int) -> torch.Tensor:
    """Index permutation p with x_half = x_interleaved[..., p]: the same row
    permutation the HF converter applies to native q/k projection weights."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))

