"""One decoder-only transformer for Mistral, Mixtral, Llama 2 and OLMo-1.

The families differ only through ModelArgs: GQA head counts, the sliding
window, the norm (weighted RMSNorm or OLMo's non-parametric LayerNorm),
clip_qkv, tied embeddings and a dense or top-k MoE FFN. Projections are
torch.matmul (nn.Linear), with q/k/v fused into `wqkv` and gate/up fused into
`w13`; norms, RoPE, the KV cache, decode attention and MoE routing go through
mixkit.ops.
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
    """Rolling-buffer cache of one layer (CONVENTIONS.md): capacity C is the
    window, or the maximum length without one; position p lives in slot p % C."""

    def __init__(self, batch: int, capacity: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, capacity, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window, self.clip_qkv = args.sliding_window, args.clip_qkv
        self.theta, self.interleaved = args.rope_theta, args.rope_interleaved
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.bias)
        self.cache: KVCache | None = None
        # flash_attn's deterministic backward (dQ without atomics): bitwise
        # reproducible training on the GPU, at some speed; set by the trainer.
        self.deterministic = False

    def _qkv(self, x, positions):
        b, s, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x)
        if self.clip_qkv is not None:  # OLMo: clamp q, k and v before RoPE
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q, k = ops.rope(q.view(b, s, h, d), k.view(b, s, hkv, d), positions, self.theta, self.interleaved)
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
                                        deterministic=self.deterministic)[None]
            return self.wo(out.reshape(x.shape[0], x.shape[1], -1))
        if self.cache is not None:
            # Chunked prefill: the cached tail plus this chunk, then the chunk
            # is appended (mixkit.ops.prefill_attn).
            out = ops.prefill_attn(q, k, v, self.cache.k[rows or slice(None)], self.cache.v[rows or slice(None)],
                                   tail or 0, window=self.window)
            return self.wo(out.reshape(x.shape[0], x.shape[1], -1))
        out = ops.flash_attn(q, k, v, causal=True, window=self.window, deterministic=self.deterministic)
        return self.wo(out.reshape(x.shape[0], x.shape[1], -1))

    def decode(self, x, positions):
        """One token per sequence: x (B, 1, dim) at positions (B, 1)."""
        b = x.shape[0]
        q, k, v = self._qkv(x, positions)
        ops.kv_cache_append(k, v, self.cache.k, self.cache.v, positions)
        seqlens = (positions[:, 0] + 1).to(torch.int32)  # tokens seen, the current one included
        out = ops.decode_attn(q.view(b, self.n_heads, self.head_dim), self.cache.k, self.cache.v, seqlens,
                              self.window)
        return self.wo(out.view(b, 1, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into w13."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.hidden_dim, bias=args.bias)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MoE(nn.Module):
    """Mixtral's sparse FFN: top-k router (mixkit.ops.moe_route), rows grouped by
    expert (moe_permute), the expert SwiGLUs as two grouped GEMMs over the
    device-side offsets (no host sync, so a decode step captures in a CUDA
    graph), weighted gather back (moe_unpermute)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts, self.top_k = args.moe_num_experts, args.moe_top_k
        self.gate = nn.Linear(args.dim, args.moe_num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(args.moe_num_experts, 2 * args.hidden_dim, args.dim))
        self.w2 = nn.Parameter(torch.empty(args.moe_num_experts, args.dim, args.hidden_dim))
        # Training sets keep_router_logits to read (router logits (T, E),
        # expert_ids (T, k)) of the last forward for the load-balancing loss.
        self.keep_router_logits = False
        self.router_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, expert_ids = ops.moe_route(router_logits, self.top_k)
        if self.keep_router_logits:
            self.router_logits = (router_logits, expert_ids)
        x_perm, offsets, row_map = ops.moe_permute(x, expert_ids, self.num_experts)
        h = ops.grouped_gemm(x_perm, self.w13, offsets, trans_b=True)
        gate, up = h.chunk(2, dim=-1)
        y_rows = ops.grouped_gemm(F.silu(gate) * up, self.w2, offsets, trans_b=True)
        return ops.moe_unpermute(y_rows, row_map, weights).view(shape)


def _make_norm(args: ModelArgs) -> nn.Module:
    return RMSNorm(args.dim, args.norm_eps) if args.norm == "rms" else LayerNorm(args.norm_eps)


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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm, self.attention = _make_norm(args), Attention(args)
        self.ffn_norm = _make_norm(args)
        self.feed_forward = MoE(args) if args.moe_num_experts else FeedForward(args)

    def forward(self, x, residual, attend):
        y, residual = _add_norm(self.attention_norm, x, residual)
        y, residual = _add_norm(self.ffn_norm, attend(self.attention, y), residual)
        return self.feed_forward(y), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = _make_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Training: recompute each block in the backward (non-reentrant
        # torch.utils.checkpoint) instead of keeping its activations.
        self.activation_checkpointing = False
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random weights for demos and benchmarks: N(0, std) matrices, unit norm weights."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.zeros_like(p))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @property
    def cache_capacity(self) -> int | None:
        cache = self.layers[0].attention.cache
        return None if cache is None else cache.k.shape[1]

    def setup_caches(self, batch: int, max_seq_len: int | None = None, dtype=None, device=None):
        """Allocate a rolling-buffer cache per layer: C = the window, or
        max_seq_len (default args.max_seq_len) without one."""
        args = self.args
        capacity = args.sliding_window or (max_seq_len or args.max_seq_len)
        ref = self.output.weight
        for layer in self.layers:  # the attention's own KV heads: a tensor-parallel rank caches only its share
            layer.attention.cache = KVCache(batch, capacity, layer.attention.n_kv_heads, args.head_dim,
                                            dtype or ref.dtype, device or ref.device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None

    def _positions(self, tokens, positions, start_pos):
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(start_pos or 0, (start_pos or 0) + s, device=tokens.device)
        return positions.expand(b, s) if positions.dim() == 1 else positions

    def _head(self, x, residual):
        return self.output(_add_norm(self.norm, x, residual)[0])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *,
                start_pos: int | None = None, rows: slice | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, S, vocab) for tokens (B, S); with return_hidden, the final
        normed hidden states (B, S, dim) instead (the input of `output`, for
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
        x, residual = self.tok_embeddings(tokens), None
        attend = lambda attn, y: attn(y, positions, rows, start_pos, docs)  # noqa: E731
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, attend, use_reentrant=False)
            else:
                x, residual = layer(x, residual, attend)
        if return_hidden:
            return _add_norm(self.norm, x, residual)[0]
        return self._head(x, residual)

    def decode_step(self, token: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """One token per sequence. token (B,) or (B, 1); cache_seqlens (B,):
        tokens already in each sequence's cache, i.e. the new token's position.
        Returns logits (B, vocab). No host sync outside the MoE expert loop."""
        b = token.shape[0]
        positions = cache_seqlens.view(b, 1).to(torch.int64)
        x, residual = self.tok_embeddings(token.view(b, 1)), None
        attend = lambda attn, y: attn.decode(y, positions)  # noqa: E731
        for layer in self.layers:
            x, residual = layer(x, residual, attend)
        return self._head(x, residual).view(b, -1)
