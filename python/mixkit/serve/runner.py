"""The model runner: page pools per layer and one forward over a mixed batch
of decodes and prefill chunks of several requests.

The batch is packed into one row of T tokens, decodes (one token each)
first. Every layer writes its new K/V through the slot mapping
(ops.paged_kv_append), then attends: decodes with ops.decode_attn_paged,
prefill chunks with ops.paged_prefill_attn (varlen), each with the layer's
own window, softmax scale, softcap and sinks (Attention.attention_kwargs).
The model's own embedding, blocks, final norm and logits run unchanged
(Transformer.embed, final_hidden, logits: Gemma's embedding scale and final
softcap); only the blocks' attention callback is this module's, the
extension point `Block.forward(x, residual, attend)` offers. Logits are
computed only for the rows that sample.

On a CUDA device, steps that are all decodes replay a CUDA graph captured
per batch-size bucket (padded rows write nothing and read nothing).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch

from .. import ops
from .._backend import gpu_kernels
from ..ops import decode as decode_op, paged as paged_op
from .blocks import NO_PAGE, BlockManager


@dataclass
class Chunk:
    """Positions [start, start + n) of one request, computed this step."""
    rid: object
    tokens: list[int]  # the n token ids
    start: int
    sample: bool  # the chunk ends at the request's last token: its logits are needed


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured decode graph: 1, 2, 4, 8, then multiples
    of 8 up to max_batch (vLLM's choice: padding costs at most 7 rows)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 8, 8))
    return sorted({min(b, max_batch) for b in sizes})


def bucket_for(n: int, buckets: list[int]) -> int | None:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def _check_gpu_attention(attns, dtype) -> None:
    """Refuse, before any request, a model whose head dim the GPU paged
    kernels do not take, rather than failing at its first step."""
    for a in attns:
        if a.head_dim not in decode_op.GPU_HEAD_DIMS or a.head_dim not in paged_op.GPU_HEAD_DIMS:
            raise ValueError(f"ModelRunner: head_dim {a.head_dim} is not served by the GPU paged kernels "
                             f"(decode: {decode_op.GPU_HEAD_DIMS}, prefill: {paged_op.GPU_HEAD_DIMS})")
        if a.head_dim == 256 and dtype == torch.float32:
            raise ValueError("ModelRunner: head_dim 256 needs bfloat16 or float16 on the GPU")


class ModelRunner:
    def __init__(self, model, blocks: BlockManager, max_model_len: int, dtype=None, device=None,
                 cuda_graphs: bool | None = None, max_batch: int = 64):
        self.model = model
        self.blocks = blocks
        self.page_size = blocks.page_size
        ref = model.output.weight
        self.device = torch.device(device or ref.device)
        self.dtype = dtype or ref.dtype
        self.max_pages = -(-max_model_len // self.page_size)
        self.attns = [layer.attention for layer in model.layers]
        if gpu_kernels(self.device):
            _check_gpu_attention(self.attns, self.dtype)
        self.windows = [a.window for a in self.attns]
        shape = lambda a: (blocks.num_pages, self.page_size, a.n_kv_heads, a.head_dim)  # noqa: E731
        self.k_pages = [torch.zeros(shape(a), dtype=self.dtype, device=self.device) for a in self.attns]
        self.v_pages = [torch.zeros(shape(a), dtype=self.dtype, device=self.device) for a in self.attns]
        self.layer_of = {id(a): i for i, a in enumerate(self.attns)}
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("ModelRunner: cuda_graphs needs the model on a CUDA device")
        self.buckets = decode_buckets(max_batch) if cuda_graphs else []
        self.graphs: dict = {}
        self.prepare_s = 0.0  # host time building the last step's inputs

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_pages + self.v_pages)

    # ---- inputs ----------------------------------------------------------------
    def _table(self, rid, group: int, width: int) -> list[int]:
        t = self.blocks.tables[rid][group]
        return (t + [NO_PAGE] * (width - len(t)))[:width]

    def prepare(self, chunks: list[Chunk], pad_to: int | None = None, width: int | None = None) -> dict:
        """Host-built inputs of a step; with pad_to, a decode-only batch padded
        to that many rows (slot -1, length 0) and tables `width` pages wide."""
        ps, dev = self.page_size, self.device
        tokens, positions = [], []
        for c in chunks:
            tokens += c.tokens
            positions += range(c.start, c.start + len(c.tokens))
        n_dec = sum(1 for c in chunks if len(c.tokens) == 1)
        ends = [c.start + len(c.tokens) for c in chunks]
        width = width or max(1, max(-(-e // ps) for e in ends))
        groups = []
        for g in range(len(self.blocks.groups)):
            tables = [self._table(c.rid, g, width) for c in chunks]
            slots = [t[p // ps] * ps + p % ps for c, t in zip(chunks, tables)
                     for p in range(c.start, c.start + len(c.tokens))]
            groups.append((tables, slots))
        pad = (pad_to or len(tokens)) - len(tokens)
        out = dict(n_dec=n_dec + pad, n_tokens=len(tokens) + pad,  # padding rows are empty decodes
                   tokens=torch.tensor(tokens + [0] * pad, device=dev),
                   positions=torch.tensor(positions + [0] * pad, device=dev),
                   seqlens=torch.tensor(ends + [0] * pad, dtype=torch.int32, device=dev),
                   tables=[torch.tensor(t + [[0] * width] * pad, dtype=torch.int32, device=dev) for t, _ in groups],
                   slots=[torch.tensor(s + [-1] * pad, dtype=torch.int64, device=dev) for _, s in groups])
        pre = chunks[n_dec:]
        if pre:
            cu = [0]
            for c in pre:
                cu.append(cu[-1] + len(c.tokens))
            out.update(cu=torch.tensor(cu, dtype=torch.int32, device=dev), max_q=max(len(c.tokens) for c in pre))
        rows, at = [], 0
        for c in chunks:
            at += len(c.tokens)
            if c.sample:
                rows.append(at - 1)
        out["sample_rows"] = rows
        return out

    # ---- the forward ---------------------------------------------------------------
    def _attend(self, inp):
        n_dec, n = inp["n_dec"], inp["n_tokens"]

        def attend(attn, y):
            layer = self.layer_of[id(attn)]
            g = self.blocks.layer_group[layer]
            kw = attn.attention_kwargs()
            q, k, v = attn._qkv(y, inp["positions"][None])
            kp, vp = self.k_pages[layer], self.v_pages[layer]
            ops.paged_kv_append(k[0], v[0], kp, vp, inp["slots"][g])
            q = q[0]
            table, lens = inp["tables"][g], inp["seqlens"]
            if n_dec == n:
                out = ops.decode_attn_paged(q, kp, vp, table, lens, window=attn.window, **kw)
            else:
                parts = []
                if n_dec:
                    parts.append(ops.decode_attn_paged(q[:n_dec], kp, vp, table[:n_dec], lens[:n_dec],
                                                       window=attn.window, **kw))
                parts.append(ops.paged_prefill_attn(q[n_dec:], kp, vp, table[n_dec:], inp["cu"], lens[n_dec:],
                                                    inp["max_q"], window=attn.window, **kw))
                out = torch.cat(parts) if len(parts) > 1 else parts[0]
            return attn.wo(out.reshape(1, n, -1))

        return attend

    def forward(self, inp, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, vocab) of the given token rows (default: the sampling rows)."""
        model = self.model
        x, residual = model.embed(inp["tokens"][None]), None
        attend = self._attend(inp)
        for layer in model.layers:
            x, residual = layer(x, residual, attend)
        if rows is None:
            rows = torch.tensor(inp["sample_rows"], dtype=torch.long, device=self.device)
        return model.logits(model.final_hidden(x[0, rows], residual[0, rows]))

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run one step; returns the logits (float32) of the chunks that sample, in order."""
        if not chunks:
            return torch.empty(0)
        decode_only = all(len(c.tokens) == 1 for c in chunks)
        bucket = bucket_for(len(chunks), self.buckets) if decode_only else None
        t0 = time.perf_counter()
        if bucket is None:
            inp = self.prepare(chunks)
            self.prepare_s = time.perf_counter() - t0
            return self.forward(inp).float()
        inp = self.prepare(chunks, pad_to=bucket, width=self.max_pages)
        self.prepare_s = time.perf_counter() - t0
        logits = self._graphed(bucket, inp)
        rows = [i for i, c in enumerate(chunks) if c.sample]
        return logits[rows].float()

    def _graphed(self, bucket: int, inp: dict) -> torch.Tensor:
        """A decode step of `bucket` rows (padded) replayed from its CUDA graph:
        the inputs are copied into the graph's static tensors first."""
        if bucket not in self.graphs:
            from ..bench.harness import capture_cuda_graph
            static = {k: v.clone() if isinstance(v, torch.Tensor) else
                      ([t.clone() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
                       else v) for k, v in inp.items()}
            all_rows = torch.arange(bucket, device=self.device)
            graph, out = capture_cuda_graph(lambda: self.forward(static, all_rows))
            self.graphs[bucket] = (graph, static, out)
        graph, static, out = self.graphs[bucket]
        for k in ("tokens", "positions", "seqlens"):
            static[k].copy_(inp[k])
        for dst, src in zip(static["tables"] + static["slots"], inp["tables"] + inp["slots"]):
            dst.copy_(src)
        graph.replay()
        return out
