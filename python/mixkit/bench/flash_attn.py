"""Flash attention (prefill / training), forward and forward + backward, at
Mistral 7B attention shapes: batch 1, 32 query heads, 8 KV heads, head dim 128,
causal, with Mistral's sliding window W = 4096 ("_w4096" ops) and without one
("_causal" ops). `tokens` is the sequence length S; these ops take their own
S sweep (SEQLENS, used by bench.run in place of the shared TOKENS table):
1k to 32k on the GPU, a few hundred tokens on the CPU, where the window
shrinks to CPU_WINDOW so that it still cuts keys off.

FLOPs (CONVENTIONS.md): a causal window W over S tokens has
pairs = W(W+1)/2 + (S-W)W visible (query, key) pairs when S >= W, and
S(S+1)/2 without a window or with W >= S; forward = 4 * pairs * D * H * B
(QK^T and PV, 2 FLOPs a multiply-add), backward 2.5x forward, so fwd+bwd is
3.5x forward. Rows carry TFLOP/s and % of the measured bf16 matmul peak
(harness.matmul_tflops, the same ceiling moe_mlp reports against).
Bytes: q, k, v read and the output written once (forward); the backward adds
q, k, v, out and dout read and dq, dk, dv written.

Peers, all on the same (B, S, H, D) tensors:
- "eager": float32 masked-softmax reference that materialises the
  (H, S, S) scores; only up to EAGER_MAX_S on the GPU (at 32k it would need
  32 x 32k^2 floats). It is the reference for the max-abs-error column.
- "sdpa": F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on
  (B, H, S, D) transposed views: on the CPU torch's own backend choice, on
  CUDA torch's choice among its fused flash and memory-efficient backends
  (never math, which would materialise the scores), plus "sdpa_cudnn", the
  cuDNN backend pinned (often the fastest on Hopper); one of the two is
  SDPA's fastest backend. Causal ops only: SDPA has no sliding window
  without a dense mask.
- "flex": torch.compile(flex_attention) with a (sliding-window) causal block
  mask built once, outside the timed region; CUDA with compile on only.
- "fa2" / "fa3": FlashAttention's flash_attn_func (flash_attn package,
  flash_attn_interface for FA3 on Hopper), window_size=(W-1, 0); CUDA only
  and only when the package imports, otherwise the peer is left out.

The fwd+bwd callables run the forward and torch.autograd.grad against a fixed
output gradient and return (out, dq, dk, dv), so the error column checks the
gradients too; nothing is kept between timed calls.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

import mixkit.ops
from mixkit._backend import gpu_kernels
from mixkit.bench.harness import Case, compiled, mixkit_op

BATCH, N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 1, 32, 8, 128  # Mistral 7B
WINDOW = 4096  # Mistral 7B v0.1 sliding window
CPU_WINDOW = 64  # on the CPU's short sequences, a window that still masks keys
EAGER_MAX_S = 4096  # largest S for the materialising reference on the GPU (32 x 4096^2 fp32 scores = 2 GiB)

# Sequence lengths, keyed like bench.TOKENS by (device type, quick).
SEQLENS = {
    ("cuda", False): (1024, 4096, 8192, 16384, 32768),
    ("cuda", True): (1024, 4096, 16384),
    ("cpu", False): (128, 512),
    ("cpu", True): (128,),
}


def visible_pairs(s: int, window: int | None) -> int:
    """(query, key) pairs a causal mask with window W leaves over S tokens."""
    if window is None or window >= s:
        return s * (s + 1) // 2
    return window * (window + 1) // 2 + (s - window) * window


def attention_flops(s: int, window: int | None, backward: bool, heads: int = N_Q_HEADS,
                    head_dim: int = HEAD_DIM, batch: int = BATCH) -> int:
    fwd = 4 * visible_pairs(s, window) * head_dim * heads * batch
    return fwd * 7 // 2 if backward else fwd  # fwd + bwd = 3.5 x fwd (bwd = 2.5 x fwd)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (sliding-window) attention in float32, q (B, S, H, D), k/v (B, S, Hkv, D).
    GQA by a (B, S, Hkv, group, D) view of q: no repeated K/V."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, s, hkv, h // hkv, d)
    scores = torch.einsum("bikgd,bjkd->bkgij", qg, k.float()) / math.sqrt(d)
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("bkgij,bjkd->bikgd", p, v.float())
    return out.reshape(b, s, h, d).to(q.dtype)


def _bhsd(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in ts)  # (B, S, H, D) -> (B, H, S, D) views


def sdpa(q, k, v, backends=None) -> torch.Tensor:
    """Causal SDPA on (B, H, S, D) views; `backends` limits torch's choice (None: any)."""
    qt, kt, vt = _bhsd(q, k, v)
    if backends is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def _flex_peer(device, s: int, window: int | None, compile_mode: str) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device=device)
    flex = compiled(flex_attention, compile_mode)

    def run(q, k, v):
        qt, kt, vt = _bhsd(q, k, v)
        return flex(qt, kt, vt, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    return run


@functools.cache
def flash_attn_packages() -> dict[str, Callable]:
    """FlashAttention's flash_attn_func, per importable package: fa2 (flash_attn), fa3 (flash_attn_interface)."""
    found = {}
    for name, module in (("fa2", "flash_attn"), ("fa3", "flash_attn_interface")):
        try:
            found[name] = importlib.import_module(module).flash_attn_func
        except Exception:  # not installed, or built for another torch / CUDA
            pass
    return found


def _fa_peer(fn: Callable, window: int | None) -> Callable:
    window_size = (-1, -1) if window is None else (window - 1, 0)

    def run(q, k, v):
        out = fn(q, k, v, causal=True, window_size=window_size)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions return (out, lse)

    return run


def _fwd_arch(device) -> int:
    fn = getattr(mixkit.ops, "flash_attn_fwd_arch", None)
    return fn(device) if fn else 0


def _forced_sm80(fn: Callable) -> Callable:
    """fn with MIXKIT_FORCE_SM80=1 set around each call (a dict write, far
    below the kernels' milliseconds)."""
    def run(*args):
        old = os.environ.get("MIXKIT_FORCE_SM80")
        os.environ["MIXKIT_FORCE_SM80"] = "1"
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["MIXKIT_FORCE_SM80"]
            else:
                os.environ["MIXKIT_FORCE_SM80"] = old
    return run


def _case(device, s: int, dtype, compile_mode: str | None, window: int | None, backward: bool) -> Case:
    cuda = torch.device(device).type == "cuda"
    # GPU shapes wherever the GPU kernels run: on a GPU, or on CPU tensors
    # under the emulated GPU (bench.emu_cost).
    if window is not None and not gpu_kernels(torch.device(device)):
        window = CPU_WINDOW
    q = torch.randn(BATCH, s, N_Q_HEADS, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(BATCH, s, N_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    op = mixkit_op("flash_attn")

    peers: dict[str, Callable] = {"mixkit": lambda q, k, v: op(q, k, v, causal=True, window=window)}
    if cuda and _fwd_arch(device) == 90:
        # The A100 kernel on the same H100, for the sm_80 goal (>= SDPA flash).
        peers["mixkit_sm80"] = _forced_sm80(lambda q, k, v: op(q, k, v, causal=True, window=window))
    if not cuda or s <= EAGER_MAX_S:
        peers["eager"] = lambda q, k, v: attention_ref(q, k, v, window)
    if window is None and not cuda:
        peers["sdpa"] = sdpa
    elif window is None:
        from torch.nn.attention import SDPBackend

        # Never the math backend on the GPU: it would materialise the scores.
        # Torch picks among flash and memory-efficient (flash where it applies).
        peers["sdpa"] = functools.partial(sdpa, backends=[SDPBackend.FLASH_ATTENTION,
                                                          SDPBackend.EFFICIENT_ATTENTION])
        peers["sdpa_cudnn"] = functools.partial(sdpa, backends=[SDPBackend.CUDNN_ATTENTION])
    if cuda and compile_mode:
        peers["flex"] = _flex_peer(device, s, window, compile_mode)
    if cuda:
        for name, fn in flash_attn_packages().items():
            peers[name] = _fa_peer(fn, window)

    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)

        def timed(fn):
            def step():
                out = fn(q, k, v)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
                return out.detach(), dq, dk, dv

            return step
    else:
        def timed(fn):
            return lambda: fn(q, k, v)

    impls = {name: timed(fn) for name, fn in peers.items()}
    # Forward: read q, k, v, write out (q's size): 2q + k + v. The backward
    # reads q, k, v, out, dout and writes dq, dk, dv: 4q + 2k + 2v more.
    elems = 2 * q.numel() + k.numel() + v.numel()
    nbytes = (3 if backward else 1) * elems * q.element_size()
    name = "flash_attn_fwd_bwd" if backward else "flash_attn_fwd"
    name += "_causal" if window is None else f"_w{WINDOW}"
    shape = f"B={BATCH} S={s} W={window or 'none'} H={N_Q_HEADS} Hkv={N_KV_HEADS} D={HEAD_DIM}"
    return Case(name, shape, dtype, nbytes, impls, tokens=s,
                flops=attention_flops(s, window, backward))


def flash_attn_fwd_w4096_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=WINDOW, backward=False)


def flash_attn_fwd_causal_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=None, backward=False)


def flash_attn_fwd_bwd_w4096_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=WINDOW, backward=True)


def flash_attn_fwd_bwd_causal_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=None, backward=True)
