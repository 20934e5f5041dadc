"""One decoder-only transformer for every family in mixkit.models.

The families differ only through ModelArgs (config.py): GQA head counts,
per-layer attention types (sliding window or full), per-layer RoPE base and
scaled RoPE, the norm and where it sits, q/k norms, clip_qkv, embedding
scale, softcaps, attention sinks, tied embeddings and a dense or top-k MoE
FFN. Projections are torch.matmul (nn.Linear), with q/k/v fused into `wqkv`
and gate/up fused into `w13`; norms, RoPE, attention, the KV cache, decode
attention and the MoE layer go through mixkit.ops.

KV caches (`setup_caches`), one per layer, sized by the layer's type: a
sliding layer with window W keeps a ring of W slots, a full layer a linear
buffer of max_seq_len slots; in both the token at absolute position p lives
in slot p % C (CONVENTIONS.md), so one rule serves both. `cache_layout`
lists the capacities, and `layers[i].attention.cache` holds layer i's
`KVCache` (k and v, (B, C_i, Hkv, D)).

An engine with caches of its own (paged) runs the blocks with its own
attention function, as `forward` does: `embed(tokens)`, then each
`layer(x, residual, attend)` where `attend(attention, y)` computes
`attention._qkv(y, positions)` and calls the attention ops with the layer's
`window` and `attention_kwargs()`, then `logits(final_hidden(x, residual))`.
Those three hooks carry the family's embedding scale, softmax scale,
softcaps and sinks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import ops
from ..nn import LayerNorm, RMSNorm
from .config import ModelArgs


class KVCache(nn.Module):
    """One layer's cache: k and v of shape (batch, capacity, n_kv_heads,
    head_dim), the token at position p in slot p % capacity. Capacity is the
    window for a sliding layer (a ring) and the longest sequence for a full
    layer (linear: nothing wraps)."""

    def __init__(self, batch: int, capacity: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, capacity, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


class UnitOffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = norm(x) * (1 + w), w stored as trained (zeros
    at initialisation). 1 + w is formed in float32 and rounded once to x's
    dtype (Hugging Face multiplies in float32; the difference is one
    rounding of the weight)."""

    def _weight(self, x):
        return (1.0 + self.weight.float()).to(x.dtype)

    def forward(self, x, residual=None):
        w = self._weight(x)
        if residual is None:
            return ops.rms_norm(x, w, self.eps)
        return ops.rms_norm_residual(x, residual, w, self.eps)


def _rms(args: ModelArgs, width: int) -> RMSNorm:
    return (UnitOffsetRMSNorm if args.norm_unit_offset else RMSNorm)(width, args.norm_eps)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window, self.clip_qkv = args.window(layer), args.clip_qkv
        (self.theta, self.rope_scaling), self.interleaved = args.rope(layer), args.rope_interleaved
        self.scale, self.softcap = args.attn_scale, args.attn_softcap
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.bias)
        # q/k RMSNorm: over the whole q and k projections (OLMo 2, OLMoE) or
        # over each head (Qwen3, Gemma 3).
        self.qk_norm = args.qk_norm
        if args.qk_norm == "proj":
            self.q_norm = _rms(args, args.n_heads * args.head_dim)
            self.k_norm = _rms(args, args.n_kv_heads * args.head_dim)
        elif args.qk_norm == "head":
            self.q_norm, self.k_norm = _rms(args, args.head_dim), _rms(args, args.head_dim)
        # gpt-oss: one learned logit per query head in every softmax's denominator.
        self.sinks = nn.Parameter(torch.zeros(args.n_heads)) if args.attn_sinks else None
        self.cache: KVCache | None = None
        # flash_attn's deterministic backward (dQ without atomics): bitwise
        # reproducible training on the GPU, at some speed; set by the trainer.
        self.deterministic = False

    def attention_kwargs(self) -> dict:
        """The attention ops' arguments beyond the window (`self.window`): the
        softmax scale, the logit softcap and the sinks, present only where the
        family has them. An engine calling the attention ops itself (paged
        caches) passes these, as this module's forward and decode do."""
        kw = {}
        if self.scale is not None:
            kw["softmax_scale"] = self.scale
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        if self.sinks is not None:
            kw["sinks"] = self.sinks.float()
        return kw

    def _qkv(self, x, positions):
        b, s, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        # (rms_norm takes contiguous rows: q and k are copied out of the fused projection.)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        elif self.qk_norm == "head":
            q, k = self.q_norm(q.reshape(b, s, h, d).contiguous()), self.k_norm(k.reshape(b, s, hkv, d).contiguous())
        if self.clip_qkv is not None:  # OLMo, OLMoE: clamp q, k and v (after the q/k norms) before RoPE
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = ops.rope(q.view(b, s, h, d), k.view(b, s, hkv, d), positions, self.theta, self.interleaved,
                        self.rope_scaling)
        return q, k, v.view(b, s, hkv, d)

    def forward(self, x, positions, rows: slice | None = None, tail: int | None = None, docs=None):
        """Prefill or training over x (B, S, dim) at positions (B, S).

        Attention masks by token order (flash_attn's causal, sliding-window
        mask); positions only feed RoPE. With a cache, `tail` is the chunk's
        start position: the chunk attends to the tokens cached before it and
        is appended to cache rows `rows` (ops.prefill_attn). docs =
        (cu_seqlens int32, max_seqlen):
        packed documents in one row, each seeing only itself.
        """
        q, k, v = self._qkv(x, positions)
        if docs is not None:
            cu, max_len = docs
            out = ops.flash_attn_varlen(q[0], k[0], v[0], cu, cu, max_len, max_len, window=self.window,
                                        deterministic=self.deterministic, **self.attention_kwargs())[None]
            return self.wo(out.reshape(x.shape[0], x.shape[1], -1))
        if self.cache is not None:
            # Chunked prefill: the cached tail plus this chunk, then the chunk
            # is appended (mixkit.ops.prefill_attn).
            out = ops.prefill_attn(q, k, v, self.cache.k[rows or slice(None)], self.cache.v[rows or slice(None)],
                                   tail or 0, window=self.window, **self.attention_kwargs())
            return self.wo(out.reshape(x.shape[0], x.shape[1], -1))
        out = ops.flash_attn(q, k, v, causal=True, window=self.window, deterministic=self.deterministic,
                             **self.attention_kwargs())
        return self.wo(out.reshape(x.shape[0], x.shape[1], -1))

    def decode(self, x, positions):
        """One token per sequence: x (B, 1, dim) at positions (B, 1)."""
        b = x.shape[0]
        q, k, v = self._qkv(x, positions)
        ops.kv_cache_append(k, v, self.cache.k, self.cache.v, positions)
        seqlens = (positions[:, 0] + 1).to(torch.int32)  # tokens seen, the current one included
        out = ops.decode_attn(q.view(b, self.n_heads, self.head_dim), self.cache.k, self.cache.v, seqlens,
                              self.window, **self.attention_kwargs())
        return self.wo(out.view(b, 1, -1))


_GATES = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class FeedForward(nn.Module):
    """Gated FFN: w2(act(w1 x) * w3 x), act SiLU (SwiGLU) or tanh-GELU
    (Gemma's GeGLU), with w1 and w3 fused into w13."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.act = _GATES[args.activation]
        self.w13 = nn.Linear(args.dim, 2 * args.hidden_dim, bias=args.bias)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


class MoE(nn.Module):
    """Sparse FFN: the top-k router (mixkit.ops.moe_route: weights
    renormalised over the k, or the full softmax's top k), then the experts
    as ops.moe_experts: rows grouped by expert, the grouped GEMMs over the
    device-side offsets (no host sync, so a decode step captures in a CUDA
    graph), the weighted gather back. gpt-oss adds a router bias, expert
    biases and its clamped SwiGLU."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, f = args.moe_num_experts, args.expert_dim
        self.num_experts, self.top_k, self.renormalize = e, args.moe_top_k, args.moe_renormalize
        self.activation = args.moe_activation
        self.swiglu = (args.moe_swiglu_alpha, args.moe_swiglu_limit)
        self.gate = nn.Linear(args.dim, e, bias=args.moe_router_bias)
        self.w13 = nn.Parameter(torch.empty(e, 2 * f, args.dim))  # gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(e, args.dim, f))
        self.b13 = nn.Parameter(torch.empty(e, 2 * f)) if args.moe_expert_bias else None
        self.b2 = nn.Parameter(torch.empty(e, args.dim)) if args.moe_expert_bias else None
        # Training sets keep_router_logits to read (router logits (T, E),
        # expert_ids (T, k)) of the last forward for the load-balancing loss.
        self.keep_router_logits = False
        self.router_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, expert_ids = ops.moe_route(router_logits, self.top_k, renormalize=self.renormalize)
        if self.keep_router_logits:
            self.router_logits = (router_logits, expert_ids)
        extra = {}
        if self.b13 is not None:
            extra.update(w13_bias=self.b13, w2_bias=self.b2)
        if self.activation != "silu":
            extra.update(activation=self.activation, swiglu_alpha=self.swiglu[0], swiglu_limit=self.swiglu[1])
        return ops.moe_experts(x, expert_ids, weights, self.w13, self.w2, **extra).view(shape)


def _add_norm(norm: nn.Module, x, residual):
    """`h = x + residual; return norm(h), h` (fused for RMSNorm). The first norm
    of the first layer has no residual yet."""
    if residual is None:
        return norm(x), x
    if isinstance(norm, RMSNorm):
        return norm(x, residual)
    h = x + residual
    return norm(h), h


class Block(nn.Module):
    """One layer. A block takes and returns (out, residual), the hidden state
    being out + residual, so that the pre-norm placements fuse the residual
    add into the next norm (ops.rms_norm_residual):
    - "pre" (Llama): h += attn(norm(h)); h += ffn(norm(h));
    - "post" (OLMo 2): h += norm(attn(h)); h += norm(ffn(h));
    - "sandwich" (Gemma): h += norm(attn(norm(h))); h += norm(ffn(norm(h))).
    """

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.placement = args.norm_placement
        make = (lambda: _rms(args, args.dim)) if args.norm == "rms" else (lambda: LayerNorm(args.norm_eps))
        if self.placement in ("pre", "sandwich"):
            self.attention_norm, self.ffn_norm = make(), make()
        if self.placement in ("post", "sandwich"):
            self.post_attention_norm, self.post_ffn_norm = make(), make()
        self.attention = Attention(args, layer)
        self.feed_forward = MoE(args) if args.is_moe(layer) else FeedForward(args)

    def forward(self, x, residual, attend):
        if self.placement == "post":
            h = x if residual is None else x + residual
            h = h + self.post_attention_norm(attend(self.attention, h))
            return self.post_ffn_norm(self.feed_forward(h)), h
        y, residual = _add_norm(self.attention_norm, x, residual)
        a = attend(self.attention, y)
        if self.placement == "sandwich":
            a = self.post_attention_norm(a)
        y, residual = _add_norm(self.ffn_norm, a, residual)
        out = self.feed_forward(y)
        if self.placement == "sandwich":
            out = self.post_ffn_norm(out)
        return out, residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = _rms(args, args.dim) if args.norm == "rms" else LayerNorm(args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Training: recompute each block in the backward (non-reentrant
        # torch.utils.checkpoint) instead of keeping its activations.
        self.activation_checkpointing = False
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random weights for demos and benchmarks: N(0, std) matrices and
        expert weights, unit norm weights (zero where the norm adds 1), zero
        biases and sinks."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(0.0 if self.args.norm_unit_offset else 1.0)
                elif p.dim() == 1 or name.endswith((".b13", ".b2")):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    # ---- caches ----------------------------------------------------------------------

    def cache_layout(self, max_seq_len: int | None = None) -> list[int]:
        """Each layer's cache capacity: its window (a ring) for a sliding
        layer, max_seq_len (default args.max_seq_len; a linear buffer) for a
        full one."""
        longest = max_seq_len or self.args.max_seq_len
        return [w or longest for w in self.args.windows]

    @property
    def cache_capacity(self) -> int | None:
        """The largest cache capacity, or None without caches."""
        caches = [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]
        return max(c.capacity for c in caches) if caches else None

    def setup_caches(self, batch: int, max_seq_len: int | None = None, dtype=None, device=None):
        """Allocate each layer's cache (`cache_layout(max_seq_len)` slots)."""
        ref = self.output.weight
        for layer, capacity in zip(self.layers, self.cache_layout(max_seq_len)):
            # The attention's own KV heads: a tensor-parallel rank caches only its share.
            attn = layer.attention
            attn.cache = KVCache(batch, capacity, attn.n_kv_heads, attn.head_dim, dtype or ref.dtype,
                                 device or ref.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None

    # ---- forward ---------------------------------------------------------------------

    def _positions(self, tokens, positions, start_pos):
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(start_pos or 0, (start_pos or 0) + s, device=tokens.device)
        return positions.expand(b, s) if positions.dim() == 1 else positions

    def embed(self, tokens):
        """Token embeddings, scaled where the family scales them (Gemma)."""
        x = self.tok_embeddings(tokens)
        if self.args.embed_scale is not None:  # in the embeddings' dtype, as Hugging Face's Gemma
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        return x

    def final_hidden(self, x, residual):
        """The final norm of the last block's (out, residual)."""
        return _add_norm(self.norm, x, residual)[0]

    def logits(self, hidden):
        """Logits of final hidden states: the output projection, then the
        final softcap where the family has one (Gemma 2)."""
        return _softcap(self.output(hidden), self.args.final_softcap)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                start_pos: int | None = None, rows: slice | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, S, vocab) for tokens (B, S); with return_hidden, the final
        normed hidden states (B, S, dim) instead (the input of `logits`, for
        losses that apply the output weight chunk by chunk).

        positions: (S,) or (B, S) absolute positions; default start_pos + arange(S).
        With caches (setup_caches), the tokens are a prefill chunk starting at
        start_pos (required): they attend to the cached tokens before them and
        are appended to cache rows `rows` (default all), which must hold the
        same number of earlier tokens.

        cu_seqlens: packed documents, tokens (1, T) holding documents
        cu_seqlens[i]:cu_seqlens[i+1] (int32/int64 (N + 1,), starting at 0 and
        ending at T). Each document gets positions from 0 and sees only itself
        (flash_attn_varlen). max_seqlen: the longest document, if known (a
        bound: it sizes the GPU grid); default T.
        """
        docs = None
        if cu_seqlens is not None:
            if tokens.shape[0] != 1 or positions is not None or self.cache_capacity is not None:
                raise ValueError("forward: cu_seqlens needs tokens of shape (1, T), no positions and no caches")
            idx = torch.arange(tokens.shape[1], device=tokens.device)
            doc_ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), idx, right=True)
            positions = (idx - cu_seqlens.to(torch.int64)[doc_ids])[None]
            # T bounds every document's length: no host sync to find the longest.
            docs = (cu_seqlens.to(torch.int32), max_seqlen or tokens.shape[1])
        elif self.cache_capacity is not None and start_pos is None:
            raise ValueError("forward: a prefill chunk into the caches needs start_pos, the position of its first "
                             "token (it says how many cached tokens the chunk attends to)")
        positions = self._positions(tokens, positions, start_pos)
        x, residual = self.embed(tokens), None
        attend = lambda attn, y: attn(y, positions, rows, start_pos, docs)  # noqa: E731
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, attend, use_reentrant=False)
            else:
                x, residual = layer(x, residual, attend)
        hidden = self.final_hidden(x, residual)
        return hidden if return_hidden else self.logits(hidden)

    def decode_step(self, token: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """One token per sequence. token (B,) or (B, 1); cache_seqlens (B,):
        tokens already in each sequence's cache, i.e. the new token's position.
        Returns logits (B, vocab). No host sync."""
        b = token.shape[0]
        positions = cache_seqlens.view(b, 1).to(torch.int64)
        x, residual = self.embed(token.view(b, 1)), None
        attend = lambda attn, y: attn.decode(y, positions)  # noqa: E731
        for layer in self.layers:
            x, residual = layer(x, residual, attend)
        return self.logits(self.final_hidden(x, residual)).view(b, -1)
