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

Attention variants of today's open models, at their shapes ("variant"
ops, VARIANTS below): gpt-oss-20b's sliding layers (64 query heads, 8 KV
heads, head dim 64, window 128, learnable sinks: "_sinks_w128") and Gemma 2
9B's global layers (16 / 8 heads, head dim 256, logit softcap 50:
"_softcap_hd256"). Their peers are the eager reference (with the sink
column and the cap), FlexAttention (the cap as its score_mod; the sink
folded in afterwards from its lse, as transformers' flex path does: out *
exp(lse - logaddexp(lse, sink))) and FlashAttention where the installed
package takes the feature (softcap=, or a sinks / learnable_sink argument).

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
import inspect
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


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (sliding-window) attention in float32, q (B, S, H, D), k/v (B, S, Hkv, D).
    GQA by a (B, S, Hkv, group, D) view of q: no repeated K/V. softcap: c *
    tanh(s / c) on the scaled scores; sinks (H,): one more logit column per
    row, dropped after the softmax."""
    b, s, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, s, hkv, h // hkv, d)
    scores = torch.einsum("bikgd,bjkd->bkgij", qg, k.float()) / math.sqrt(d)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        p = torch.softmax(scores, dim=-1)
    else:
        col = sinks.float().view(1, hkv, h // hkv, 1, 1).expand(b, hkv, h // hkv, s, 1)
        p = torch.softmax(torch.cat([scores, col], dim=-1), dim=-1)[..., :-1]
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


def _flex_peer(device, s: int, window: int | None, compile_mode: str, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> Callable:
    """Compiled flex_attention with the (windowed) causal block mask; a
    softcap as its score_mod, sinks folded in from its lse afterwards."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device=device)
    flex = compiled(flex_attention, compile_mode)

    def run(q, k, v):
        qt, kt, vt = _bhsd(q, k, v)
        if sinks is None:
            out = flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        else:
            out, lse = flex(qt, kt, vt, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                            return_lse=True)
            # lse (B, H, S) over the keys alone: the sink's share of each row's mass is removed.
            keep = torch.exp(lse - torch.logaddexp(lse, sinks.view(1, -1, 1)))
            out = (out * keep[..., None]).to(q.dtype)
        return out.transpose(1, 2)

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


def fa_feature_kwargs(fn: Callable, softcap: float | None, sinks: torch.Tensor | None) -> dict | None:
    """The keyword arguments that hand a softcap and sinks to a FlashAttention
    function (softcap=; sinks under whichever name this version uses), or
    None when it takes one of them not at all."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a compiled function without a signature
        params = {}
    extra = {}
    if softcap is not None:
        if "softcap" not in params:
            return None
        extra["softcap"] = softcap
    if sinks is not None:
        name = next((n for n in ("learnable_sink", "sinks", "s_aux") if n in params), None)
        if name is None:
            return None
        extra[name] = sinks
    return extra


def _fa_peer(fn: Callable, window: int | None, softcap: float | None = None,
             sinks: torch.Tensor | None = None) -> Callable | None:
    """FlashAttention with the window and, where this package's function
    takes them, the softcap and the sinks; None when it lacks a feature."""
    window_size = (-1, -1) if window is None else (window - 1, 0)
    extra = fa_feature_kwargs(fn, softcap, sinks)
    if extra is None:
        return None

    def run(q, k, v):
        out = fn(q, k, v, causal=True, window_size=window_size, **extra)
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


# Shapes of the variant ops: (query heads, KV heads, head dim, window,
# softcap, sinks). gpt-oss-20b's sliding layers; Gemma 2 9B's global layers.
VARIANTS = {
    "sinks_w128": (64, 8, 64, 128, None, True),
    "softcap_hd256": (16, 8, 256, None, 50.0, False),
}


def _case(device, s: int, dtype, compile_mode: str | None, window: int | None, backward: bool,
          variant: str | None = None) -> Case:
    cuda = torch.device(device).type == "cuda"
    heads, kv_heads, head_dim, softcap, with_sinks = N_Q_HEADS, N_KV_HEADS, HEAD_DIM, None, False
    if variant is not None:
        heads, kv_heads, head_dim, window, softcap, with_sinks = VARIANTS[variant]
    # GPU shapes wherever the GPU kernels run: on a GPU, or on CPU tensors
    # under the emulated GPU (bench.emu_cost).
    if window is not None and not gpu_kernels(torch.device(device)):
        window = min(window, CPU_WINDOW)
    q = torch.randn(BATCH, s, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(BATCH, s, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    # gpt-oss's sinks sit around the scores' own log-sum-exp scale.
    sinks = (torch.randn(heads, device=device) + 2.0).requires_grad_(backward) if with_sinks else None
    op = mixkit_op("flash_attn")
    extra = dict(softcap=softcap, sinks=sinks) if variant is not None else {}

    peers: dict[str, Callable] = {"mixkit": lambda q, k, v: op(q, k, v, causal=True, window=window, **extra)}
    if cuda and _fwd_arch(device) == 90:
        # The A100 kernel on the same H100, for the sm_80 goal (>= SDPA flash).
        peers["mixkit_sm80"] = _forced_sm80(lambda q, k, v: op(q, k, v, causal=True, window=window, **extra))
    if not cuda or s <= EAGER_MAX_S:
        peers["eager"] = lambda q, k, v: attention_ref(q, k, v, window, softcap, sinks)
    if variant is not None:
        pass  # SDPA takes neither a softcap nor sinks (short of a dense float mask)
    elif window is None and not cuda:
        peers["sdpa"] = sdpa
    elif window is None:
        from torch.nn.attention import SDPBackend

        # Never the math backend on the GPU: it would materialise the scores.
        # Torch picks among flash and memory-efficient (flash where it applies).
        peers["sdpa"] = functools.partial(sdpa, backends=[SDPBackend.FLASH_ATTENTION,
                                                          SDPBackend.EFFICIENT_ATTENTION])
        peers["sdpa_cudnn"] = functools.partial(sdpa, backends=[SDPBackend.CUDNN_ATTENTION])
    if cuda and compile_mode:
        peers["flex"] = _flex_peer(device, s, window, compile_mode, softcap, sinks)
    if cuda:
        for name, fn in flash_attn_packages().items():
            peer = _fa_peer(fn, window, softcap, sinks)
            if peer is not None:
                peers[name] = peer

    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)
        wrt = (q, k, v) + ((sinks,) if sinks is not None else ())

        def timed(fn):
            def step():
                out = fn(q, k, v)
                grads = torch.autograd.grad(out, wrt, dout)
                return (out.detach(),) + grads

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
    if variant is not None:
        name += f"_{variant}"
    else:
        name += "_causal" if window is None else f"_w{WINDOW}"
    shape = f"B={BATCH} S={s} W={window or 'none'} H={heads} Hkv={kv_heads} D={head_dim}"
    if variant is not None:
        shape += f" softcap={softcap or 'none'} sinks={'yes' if with_sinks else 'no'}"
    return Case(name, shape, dtype, nbytes, impls, tokens=s,
                flops=attention_flops(s, window, backward, heads, head_dim))


def flash_attn_fwd_w4096_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=WINDOW, backward=False)


def flash_attn_fwd_causal_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=None, backward=False)


def flash_attn_fwd_bwd_w4096_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=WINDOW, backward=True)


def flash_attn_fwd_bwd_causal_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, window=None, backward=True)


def flash_attn_fwd_sinks_w128_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, None, backward=False, variant="sinks_w128")


def flash_attn_fwd_bwd_sinks_w128_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, None, backward=True, variant="sinks_w128")


def flash_attn_fwd_softcap_hd256_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, None, backward=False, variant="softcap_hd256")


def flash_attn_fwd_bwd_softcap_hd256_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    return _case(device, tokens, dtype, compile_mode, None, backward=True, variant="softcap_hd256")
