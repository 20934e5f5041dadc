"""Training throughput: tokens/s and MFU of one optimizer step, mixkit's
Trainer against Hugging Face transformers on the same device, in one run.

    python -m mixkit.bench.train [--device cuda|cpu] [--quick] [--out FILE.json] [--steps N]
                                 [--seq-len 4096] [--grad-accum G] [--no-compile] [--tiny]

Models (GPU; random weights, bf16 compute, sequences of 4096 tokens):

- mistral-1b: Mistral-shaped, dim 2048, 18 layers, 16 query / 8 KV heads of
  128, SwiGLU hidden 5632, window 4096, vocab 32000, untied head:
  980,494,336 parameters, 914,882,560 of them multiplied per token
  (N_active of mixkit.train.flops: no embedding lookup, no norms).
- mixtral-small: Mixtral-shaped, dim 1024, 4 layers, 8 query / 2 KV heads of
  128, 8 experts of hidden 3584, top-2, no window, vocab 32000: 428,385,280
  parameters, 131,366,912 active per token.

One optimizer step is G micro-batches of one packed row of T tokens (grad
accumulation): G = 4 with --quick (16,384 tokens per step), else 8 (32,768).
A row holds documents of lengths drawn uniformly from [T/8, T] until it is
full (the last one cut), given to mixkit as cu_seqlens and to transformers
as position_ids that restart at every document (transformers then masks
attention per document: a block-causal mask for SDPA, varlen for
FlashAttention 2). Every step has the same document lengths (fresh random
tokens), so every step has the same FLOPs.

Implementations (rows):

- "mixkit": mixkit.train.Trainer.train_step: float32 master weights, bf16
  compute (the trainer's parameter casts), fused AdamW (build_optimizer),
  chunked cross-entropy, global-norm clipping at 1.0, MoE load-balancing loss
  (coef 0.02) for Mixtral.
- "hf-sdpa", "hf-fa2": MistralForCausalLM / MixtralForCausalLM built from the
  same ModelArgs (bench.models.hf_config), attn_implementation "sdpa" and
  "flash_attention_2" (only when flash_attn is importable), Mixtral experts
  in transformers' default experts_implementation (recorded in the note).
- "hf-compile": the SDPA model's forward plus loss under torch.compile
  (mode "default": max-autotune of a 1B forward and backward takes many
  minutes; on the CPU backend "eager", a trace-only smoke test).

The comparison is like with like: every implementation starts from the same
float32 weights (transformers' own random init, copied into mixkit through
the checkpoint key map of mixkit.models.load), sees the same tokens in the
same order, and runs the same precision policy and optimizer: float32
parameters, gradients and AdamW state; bf16 matmuls (mixkit: bf16 casts of
the parameters; transformers: torch.autocast(bf16), its documented mixed
precision, which keeps the norms and the residual stream in float32);
AdamW(lr 3e-4, betas (0.9, 0.95), eps 1e-5, weight decay 0.1 on matrices
only, fused on CUDA) built by mixkit.train.build_optimizer for every model;
clip at global norm 1.0; the loss summed over each micro-batch's targets and
divided by the step's target count (transformers: its own ForCausalLMLoss
with num_items_in_batch, as its Trainer does under grad accumulation). Each
row records the losses of its steps; `loss_diff_vs_mixkit` is its first
step's loss (the same weights, before any update) minus mixkit's.
Activation checkpointing is off; a row that runs out of memory is retried
once with it on (mixkit: TrainConfig.activation_checkpointing; transformers:
gradient_checkpointing_enable), and the row says so.

FLOPs (mixkit.train.flops.batch_flops, the same count for every
implementation): per micro-batch 6 * N_active * tokens + 12 * L * H * D *
pairs, N_active the matmul weights per token (no embedding lookup; the head;
top_k of the experts plus the router), pairs the visible causal (query, key)
pairs per document and window. model TFLOP/s = FLOPs per step / median step
time; MFU = that / harness.matmul_tflops (bf16 8192^3 torch.matmul on the
GPU, measured in the same run; on the CPU float32 1024^3).

Timing: CUDA-synchronised wall time of whole optimizer steps (forward,
backward, clipping, AdamW, the host-to-device copy of the micro-batches),
after warm-up steps (which include compilation), median and p20/p80 of the
timed steps. Peak memory: torch.cuda.max_memory_allocated over the row
(weights, gradients, AdamW state and activations). One model is alive at a
time. With `--tiny` (any device) the same code runs on the tiny named
configs: a check of the wiring, not numbers to quote.

CPU (`--device cpu`): mixkit against transformers at the quick start's
shapes, the numbers behind "the quick start trains at least as fast as plain
transformers on the CPU":

- "quickstart": the model, batch (rows x seq_len), micro-batches and
  TrainConfig of mixkit.train.run.quickstart_config("cpu"), read at run
  time, so the bench follows the quick start when it changes. Without
  --quick also two longer shapes, so that a win is not one shape's:
  "quickstart-s1024" (the same model, rows of 1024 tokens) and "d64-s1024"
  (head dim 64, no window, rows of 1024 tokens).
- Each row of a micro-batch is one document (what the quick start's packer
  makes of files longer than a row, most of them; transformers gets no
  document masking to do, mixkit no boundary to skip work at). mixkit gets
  the rows packed into one sequence with cu_seqlens, as its data loader
  gives them to the Trainer; transformers gets (rows, seq_len).
- Both use the quick start's TrainConfig: its CPU precision (bf16 compute
  over float32 master weights on a CPU with native bf16: mixkit's bf16
  parameter casts, transformers under torch.autocast(bf16); else float32;
  without --quick the float32 shape as well), its AdamW (build_optimizer),
  clipping, learning-rate schedule and loss chunking (mixkit);
  transformers' MistralForCausalLM with attn_implementation="sdpa" and its
  own loss, from the same weights.
- Timing is interleaved: one optimizer step of each in turn (the order
  alternating), so both see the same machine load; tokens/s from the median
  step, `mixkit_speedup` the median of the per-pair ratios (transformers'
  step time / mixkit's) with its min and max, CPU seconds per step (all
  threads) beside wall time, the thread counts and the load average.
- The tiny configs follow as the wiring check (with the eager-backend
  torch.compile smoke test).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mixkit.bench import harness
from mixkit.bench.models import build_hf, build_mixkit, hf_attn_impls
from mixkit.models import CONFIGS, ModelArgs, Transformer
from mixkit.models.loading import _hf_map
from mixkit.train import IGNORE_INDEX, TrainConfig, Trainer, active_params, batch_flops, build_optimizer, lr_at

MISTRAL_1B = ModelArgs(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=5632,
                       vocab_size=32000, rope_theta=1e4, sliding_window=4096, max_seq_len=4096)
MIXTRAL_SMALL = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=3584,
                          vocab_size=32000, rope_theta=1e6, max_seq_len=4096, moe_num_experts=8, moe_top_k=2)

# The training settings every implementation shares (OLMo / Llama 2 AdamW).
# No warmup, so that the second step already moves the weights by lr and the
# recorded losses also compare the optimizers.
TRAIN = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, warmup_steps=0, max_steps=1000,
             grad_clip=1.0, moe_aux_loss_coef=0.02, precision="bf16")


# ---------------------------------------------------------------------------
# Plan, data, weights
# ---------------------------------------------------------------------------


def plan(device: str, quick: bool, steps: int | None = None, seq_len: int | None = None,
         grad_accum: int | None = None, tiny: bool = False) -> dict:
    """Models and sizes: the ~1B Mistral and the small Mixtral on the GPU;
    the tiny named configs on the CPU or with `tiny`."""
    cuda = torch.device(device).type == "cuda"
    if cuda and not tiny:
        p = dict(models=[("mistral-1b", MISTRAL_1B), ("mixtral-small", MIXTRAL_SMALL)], seq_len=4096,
                 grad_accum=4 if quick else 8, warmup=2 if quick else 3, steps=3 if quick else 10,
                 compile=not quick, no_compile_reason="--quick skips torch.compile (minutes per 1B training graph)")
    else:
        p = dict(models=[("tiny-mistral", CONFIGS["tiny-mistral"]), ("tiny-mixtral", CONFIGS["tiny-mixtral"])],
                 seq_len=64, grad_accum=2, warmup=2, steps=2 if quick else 5, compile=True)
        if not cuda and not tiny:
            p["cpu_speed"] = cpu_speed_models(quick)
            p["cpu_warmup"], p["cpu_steps"] = (1, 3) if quick else (2, 10)
    if steps:
        p["steps"] = steps
        if "cpu_speed" in p:
            p["cpu_steps"] = steps
    if seq_len:
        p["seq_len"] = seq_len
    if grad_accum:
        p["grad_accum"] = grad_accum
    return p


def cpu_speed_models(quick: bool) -> list[dict]:
    """The CPU comparison's models: the quick start's (model, rows x seq_len,
    micro-batches and TrainConfig from quickstart_config), and without
    `quick` two longer shapes and, where the quick start computes in bf16
    (a CPU with native bf16), its shape in float32 as well."""
    from mixkit.train.run import quickstart_config

    tcfg, dcfg = quickstart_config("cpu")
    qs = dict(name="quickstart", cfg=tcfg, seq_len=dcfg.seq_len, rows=dcfg.batch_size, grad_accum=tcfg.grad_accum)
    out = [qs]
    if not quick:
        tokens = dcfg.seq_len * dcfg.batch_size
        if tcfg.precision != "fp32":
            out.append({**qs, "name": "quickstart-fp32", "cfg": tcfg.replace(precision="fp32")})
        out.append({**qs, "name": "quickstart-s1024", "seq_len": 1024, "rows": max(1, tokens // 1024)})
        d64 = {**tcfg.model, "dim": 256, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "hidden_dim": 768,
               "sliding_window": None}
        out.append({**qs, "name": "d64-s1024", "cfg": tcfg.replace(model=d64), "seq_len": 1024,
                    "rows": max(1, tokens // 1024)})
    for m in out:
        m["cfg"] = m["cfg"].replace(model={**m["cfg"].model, "max_seq_len": max(m["cfg"].model.get(
            "max_seq_len", 0), m["seq_len"])})
    return out


def whole_rows(n_steps: int, grad_accum: int, rows: int, seq_len: int, vocab: int, seed: int = 0) -> list[list[dict]]:
    """n_steps optimizer steps of grad_accum micro-batches of `rows` rows of
    seq_len tokens, each row one document; packed into one sequence with
    cu_seqlens for mixkit, "rows" telling HFStep to give transformers
    (rows, seq_len)."""
    gen = torch.Generator().manual_seed(seed)
    return [[{**packed_row([seq_len] * rows, vocab, gen), "rows": rows} for _ in range(grad_accum)]
            for _ in range(n_steps)]


def doc_lengths(seq_len: int, gen: torch.Generator) -> list[int]:
    """Document lengths of one packed row: uniform in [seq_len/8, seq_len] until full, the last one cut."""
    lengths, left = [], seq_len
    while left:
        n = int(torch.randint(max(seq_len // 8, 1), seq_len + 1, (1,), generator=gen))
        lengths.append(min(n, left))
        left -= lengths[-1]
    return lengths


def packed_row(lengths: list[int], vocab: int, gen: torch.Generator) -> dict:
    """One micro-batch in mixkit's training format (mixkit.data.packing):
    labels[t] = tokens[t + 1] inside a document, -100 on its last token."""
    tokens = torch.randint(0, vocab, (sum(lengths),), generator=gen)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    cu = [0]
    for n in lengths:
        s = cu[-1]
        labels[s:s + n - 1] = tokens[s + 1:s + n]
        cu.append(s + n)
    return {"input_ids": tokens[None], "labels": labels[None], "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(lengths)}


def make_steps(n_steps: int, grad_accum: int, seq_len: int, vocab: int, seed: int = 0) -> list[list[dict]]:
    """n_steps optimizer steps of grad_accum micro-batches (on the host). The
    document lengths repeat every step (so do the FLOPs); the tokens do not."""
    gen = torch.Generator().manual_seed(seed)
    layout = [doc_lengths(seq_len, gen) for _ in range(grad_accum)]
    return [[packed_row(lengths, vocab, gen) for lengths in layout] for _ in range(n_steps)]


def step_flops(args: ModelArgs, micro_batches: list[dict]) -> float:
    return sum(batch_flops(args, torch.diff(mb["cu_seqlens"].long()).tolist()) for mb in micro_batches)


def param_count(args: ModelArgs) -> int:
    with torch.device("meta"):
        model = Transformer(args)
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


def reference_weights(args: ModelArgs, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers' random init of the model, float32, as a state dict on the host (HF keys)."""
    model = build_hf(args, device, torch.float32, "sdpa", seed=seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    free()
    return state


def mixkit_from_hf_state(args: ModelArgs, state: dict[str, torch.Tensor], device) -> Transformer:
    """A float32 Transformer on `device` holding `state` (HF keys), through
    the key map mixkit.models.load reads checkpoints with."""
    model = build_mixkit(args, device, torch.float32)
    mapping, optional = _hf_map(args, set(state))
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for key, tensor in state.items():
            if key in optional and key not in mapping:
                continue
            name, index, transform = mapping[key]  # a KeyError here: a key the map does not know
            target = params[name] if index is None else params[name][index]
            target.copy_(tensor if transform is None else transform(tensor))
            filled.add(name)
    if set(params) - filled:
        raise RuntimeError(f"mixkit_from_hf_state: no HF key filled {sorted(set(params) - filled)[:3]}")
    return model.train()


def hf_from_state(args: ModelArgs, state: dict[str, torch.Tensor], device, attn: str):
    model = build_hf(args, device, torch.float32, attn)
    model.load_state_dict(state, strict=True)
    return model.train()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_config(args: ModelArgs, checkpointing: bool = False, precision: str = "bf16") -> TrainConfig:
    base = "mixtral-8x7b" if args.moe_num_experts else "mistral-7b-v0.1"
    return TrainConfig(model_name=base, model=dataclasses.asdict(args),
                       **{**TRAIN, "precision": precision}, activation_checkpointing=checkpointing)


# ---------------------------------------------------------------------------
# One optimizer step per implementation: step(micro_batches) -> loss (float)
# ---------------------------------------------------------------------------


class MixkitStep:
    """mixkit.train.Trainer.train_step; the loss is the step's cross-entropy."""

    def __init__(self, model: Transformer, cfg: TrainConfig):
        self.trainer = Trainer(model, cfg)

    def __call__(self, micro_batches: list[dict]) -> float:
        return self.trainer.train_step(micro_batches)["loss"]


class HFStep:
    """The same step for a transformers model: torch.autocast(bf16) over its
    float32 parameters, its ForCausalLMLoss summed over the step's targets
    (num_items_in_batch), the Mixtral load-balancing loss weighted by
    moe_aux_loss_coef / G as mixkit's trainer does, global-norm clipping and
    the same fused AdamW. `compile`: torch.compile of forward + loss."""

    def __init__(self, model, cfg: TrainConfig, compile_kw: dict | None = None):
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.moe = hasattr(model.config, "num_local_experts")
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.autocast = cfg.precision == "bf16"
        self.loss = torch.compile(self._loss, dynamic=False, **compile_kw) if compile_kw is not None else self._loss

    def _loss(self, input_ids, position_ids, targets, n_targets):
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             **({"output_router_logits": True} if self.moe else {}))
            # labels=None with shift_labels: the targets are already shifted (mixkit's format)
            ce = self.model.loss_function(out.logits, None, self.model.config.vocab_size,
                                          num_items_in_batch=n_targets, shift_labels=targets)
        return ce, (out.aux_loss if self.moe else None)

    def __call__(self, micro_batches: list[dict]) -> float:
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        n_targets = torch.tensor(max(n, 1), dtype=torch.float32, device=self.device)
        ce_total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            rows = mb.get("rows", 1)  # rows of whole documents: (rows, T / rows), plain causal masks
            ids = mb["input_ids"].view(rows, -1).to(self.device, non_blocking=True)
            targets = mb["labels"].view(rows, -1).to(self.device, non_blocking=True)
            cu = mb["cu_seqlens"].long()
            starts = torch.repeat_interleave(cu[:-1], torch.diff(cu))
            positions = (torch.arange(ids.numel()) - starts).view(rows, -1).to(self.device, non_blocking=True)
            ce, aux = self.loss(ids, positions, targets, n_targets)
            loss = ce
            if aux is not None and self.cfg.moe_aux_loss_coef > 0:
                loss = loss + self.cfg.moe_aux_loss_coef / len(micro_batches) * aux
            loss.backward()
            ce_total += ce.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(ce_total)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, device: str, p: dict, log: Callable[[str], None] | None = print):
        self.device, self.p, self.log = device, p, log
        self.cuda = torch.device(device).type == "cuda"
        self.peak_tflops = harness.matmul_tflops(device)
        # per row dtype: on the CPU a bf16 row's ceiling is the bf16 matmul's
        # (each peak is measured once: harness caches it per device and dtype)
        self.peaks = {"fp32": harness.matmul_tflops(device, torch.float32),
                      "bf16": harness.matmul_tflops(device, torch.bfloat16)}
        self.rows: list[dict] = []

    def row(self, name: str, args: ModelArgs, impl: str, **extra) -> dict:
        p = self.p
        r = {"op": "train", "model": name, "impl": impl, "dtype": "bf16",
             "shape": f"{name} T={p['seq_len']} x{p['grad_accum']}", "seq_len": p["seq_len"],
             "grad_accum": p["grad_accum"], "tokens_per_step": p["seq_len"] * p["grad_accum"],
             "params": param_count(args), "active_params": active_params(args), **extra}
        self.rows.append(r)
        return r

    def emit(self, r: dict):
        if self.log:
            self.log(_one_line(r))

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, r: dict, args: ModelArgs, steps: list[list[dict]], make: Callable[[bool], Callable]):
        """Warm-up then timed optimizer steps of `make(checkpointing)()`; an
        out-of-memory error retries once with activation checkpointing."""
        for checkpointing in (False, True):
            step = None
            try:
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                step = make(checkpointing)
                r["activation_checkpointing"] = checkpointing
                losses, times = [], []
                for micro_batches in steps:
                    self._sync()
                    t0 = time.perf_counter()
                    losses.append(step(micro_batches))
                    self._sync()
                    times.append(time.perf_counter() - t0)
                warm = self.p["warmup"]
                timed = times[warm:]
                r.update(losses=losses, first_step_s=times[0], steps=len(timed), median_s=statistics.median(timed))
                q = statistics.quantiles(timed, n=5, method="inclusive") if len(timed) > 1 else [timed[0]] * 4
                r.update(p20_s=q[0], p80_s=q[3], method="synchronised wall time per optimizer step")
                flops = step_flops(args, steps[0])
                r.update(flops_per_step=flops, tokens_per_s=r["tokens_per_step"] / r["median_s"],
                         tflops=flops / r["median_s"] / 1e12)
                r["mfu"] = r["tflops"] / self.peaks[r["dtype"]]
                if self.cuda:
                    r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                return
            except torch.OutOfMemoryError as exc:  # the finally below frees it before the retry
                if checkpointing:
                    r["error"] = _error(exc)
                else:
                    r["note"] = (r.get("note", "") + "; out of memory without activation checkpointing").lstrip("; ")
            except Exception as exc:  # one broken peer must not sink the run
                r["error"] = _error(exc)
                return
            finally:
                del step
                free()

    def model(self, name: str, args: ModelArgs):
        p = self.p
        steps = make_steps(p["warmup"] + p["steps"], p["grad_accum"], p["seq_len"], args.vocab_size)
        state = reference_weights(args, self.device)

        def mixkit(checkpointing):
            return MixkitStep(mixkit_from_hf_state(args, state, self.device), train_config(args, checkpointing))

        r = self.row(name, args, "mixkit", note="Trainer.train_step: bf16 parameter casts over float32 masters, "
                                                "cu_seqlens (flash_attn_varlen)")
        self.measure(r, args, steps, mixkit)
        self.emit(r)

        for impl, attn in hf_attn_impls(self.device):
            if attn is None:
                self.emit(self.row(name, args, impl, skipped="flash_attn (FlashAttention 2) is not importable"))
                continue
            r = self.row(name, args, impl, note=_hf_note(attn))
            self.measure(r, args, steps, lambda ckpt, r=r, attn=attn: self._hf_step(r, args, state, attn, ckpt))
            self.emit(r)

        if not p["compile"]:
            self.emit(self.row(name, args, "hf-compile", skipped=p["no_compile_reason"]))
        else:
            kw = {} if self.cuda else {"backend": "eager"}
            how = "torch.compile(forward + loss, mode=default)" if self.cuda else \
                "torch.compile(backend=eager) on CPU: a trace smoke test"
            r = self.row(name, args, "hf-compile", note=f"{how}; {_hf_note('sdpa')}")
            try:
                self.measure(r, args, steps, lambda ckpt: self._hf_step(r, args, state, "sdpa", ckpt, kw))
            finally:
                torch._dynamo.reset()  # compiled code holds the model's weights
                free()
            self.emit(r)

    def speed_model(self, m: dict):
        """mixkit and transformers (SDPA) at one CPU shape, their optimizer
        steps interleaved (the order alternating) so both see the same load."""
        cfg, rows, seq_len, accum = m["cfg"], m["rows"], m["seq_len"], m["grad_accum"]
        args = cfg.model_args()
        warm, timed = self.p["cpu_warmup"], self.p["cpu_steps"]
        steps = whole_rows(warm + timed, accum, rows, seq_len, args.vocab_size)
        state = reference_weights(args, self.device)
        flops = step_flops(args, steps[0])
        base = dict(shape=f"{m['name']} {rows}x{seq_len} x{accum}", seq_len=seq_len, rows=rows, grad_accum=accum,
                    tokens_per_step=rows * seq_len * accum, dtype=cfg.precision, interleaved=True,
                    threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
        impls = [("mixkit", f"Trainer.train_step with the quick start's TrainConfig ({cfg.precision}), "
                            "rows packed with cu_seqlens (flash_attn_varlen)",
                  lambda: MixkitStep(mixkit_from_hf_state(args, state, self.device), cfg)),
                 ("hf-sdpa", f"{cfg.precision}, attn_implementation=sdpa, (rows, seq_len) batches",
                  lambda: HFStep(hf_from_state(args, state, self.device, "sdpa"), cfg))]
        rs = [self.row(m["name"], args, impl, note=note, **base) for impl, note, _ in impls]
        try:
            runners = [make() for _, _, make in impls]
        except Exception as exc:
            for r in rs:
                r["error"] = _error(exc)
                self.emit(r)
            return
        load0 = os.getloadavg()[0]
        wall = [[] for _ in impls]
        cpu = [[] for _ in impls]
        losses = [[] for _ in impls]
        for i, micro_batches in enumerate(steps):
            order = range(len(impls)) if i % 2 == 0 else reversed(range(len(impls)))
            for k in order:
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    losses[k].append(runners[k](micro_batches))
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
                except Exception as exc:  # one broken peer must not sink the run
                    rs[k].setdefault("error", _error(exc))
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]
        for k, r in enumerate(rs):
            if "error" in r:
                self.emit(r)
                continue
            t, c = wall[k][warm:], cpu[k][warm:]
            q = statistics.quantiles(t, n=5, method="inclusive") if len(t) > 1 else [t[0]] * 4
            r.update(losses=losses[k], first_step_s=wall[k][0], steps=len(t), median_s=statistics.median(t),
                     p20_s=q[0], p80_s=q[3], cpu_s=statistics.median(c), load_avg=load,
                     method="wall time per optimizer step, steps of the two interleaved",
                     activation_checkpointing=False, flops_per_step=flops)
            r.update(tokens_per_s=r["tokens_per_step"] / r["median_s"], tflops=flops / r["median_s"] / 1e12)
            r["mfu"] = r["tflops"] / self.peaks[r["dtype"]]
        mine, peer = rs
        if "error" not in mine and "error" not in peer:
            ratios = [b / a for a, b in zip(wall[0][warm:], wall[1][warm:])]
            peer.update(pair_speedup_median=statistics.median(ratios), pair_speedup_min=min(ratios),
                        pair_speedup_max=max(ratios))
        for r in rs:
            self.emit(r)

    def _hf_step(self, r: dict, args, state, attn, checkpointing, compile_kw=None):
        model = hf_from_state(args, state, self.device, attn)
        experts = getattr(model.config, "_experts_implementation", None)
        if args.moe_num_experts and experts and "experts_implementation" not in r["note"]:
            r["note"] += f", experts_implementation={experts}"
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return HFStep(model, train_config(args, checkpointing), compile_kw)


def _hf_note(attn: str) -> str:
    return f"autocast bf16 over float32 params, attn_implementation={attn}, position_ids restart per document"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _finish(rows: list[dict]):
    """mixkit_speedup = this row's step time / mixkit's (same model): > 1, mixkit is faster;
    loss_diff_vs_mixkit = this row's first-step loss - mixkit's (the same weights and tokens)."""
    mine = {r["model"]: r for r in rows if r["impl"] == "mixkit" and "median_s" in r}
    for r in rows:
        ref = mine.get(r["model"])
        if ref is not None and r is not ref and "median_s" in r:
            # interleaved rows: the median of the per-pair ratios, robust to load drifting
            r["mixkit_speedup"] = r.get("pair_speedup_median", r["median_s"] / ref["median_s"])
            r["loss_diff_vs_mixkit"] = r["losses"][0] - ref["losses"][0]


def run(device: str | None = None, quick: bool = False, steps: int | None = None, seq_len: int | None = None,
        grad_accum: int | None = None, compile: bool = True, tiny: bool = False, models: list[str] | None = None,
        log: Callable[[str], None] | None = print) -> tuple[dict, list[dict]]:
    """Run the training benchmark; returns (metadata, rows)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device cuda asked for, but torch {torch.__version__} sees no CUDA GPU")
    try:
        import transformers  # the peers, and the reference weights every implementation starts from
    except ImportError as exc:
        raise ValueError(f"the training benchmark needs transformers: {exc}") from None

    p = plan(device, quick, steps, seq_len, grad_accum, tiny)
    if not compile:
        p["compile"], p["no_compile_reason"] = False, "--no-compile"
    if models:
        known = [m["name"] for m in p.get("cpu_speed", [])] + [n for n, _ in p["models"]]
        if [m for m in models if m not in known]:
            raise ValueError(f"unknown models {models}; this plan has {', '.join(known)}")
        p["models"] = [(n, a) for n, a in p["models"] if n in models]
    p["models"] = [(n, a.replace(max_seq_len=max(a.max_seq_len, p["seq_len"]))) for n, a in p["models"]]
    torch.manual_seed(0)
    meta = harness.collect_metadata(device)
    bench = Bench(device, p, log)
    meta.update(matmul_tflops=bench.peak_tflops, matmul_tflops_by_dtype=bench.peaks, quick=quick, tiny=tiny, transformers=transformers.__version__,
                seq_len=p["seq_len"], grad_accum=p["grad_accum"], tokens_per_step=p["seq_len"] * p["grad_accum"],
                warmup_steps=p["warmup"], timed_steps=p["steps"], train=TRAIN,
                models={n: dataclasses.asdict(a) for n, a in p["models"]},
                timing="synchronised wall time per optimizer step" if cuda else "perf_counter per step",
                compile_mode=("default" if cuda else "backend=eager") if p["compile"] else None,
                flops="batch_flops: 6*N_active*tokens + 12*L*H*D*visible_pairs per document; "
                      "MFU = FLOP/s / matmul_tflops_by_dtype[the row's dtype]")
    if p.get("cpu_speed"):
        meta.update(cpu_speed_models={m["name"]: dict(model=m["cfg"].model, rows=m["rows"], seq_len=m["seq_len"],
                                                      grad_accum=m["grad_accum"], precision=m["cfg"].precision)
                                      for m in p["cpu_speed"]},
                    cpu_speed_steps=dict(warmup=p["cpu_warmup"], timed=p["cpu_steps"]),
                    torch_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                    load_avg_start=os.getloadavg()[0])
    if log:
        log(f"{meta['device_name']}: matmul {bench.peak_tflops:.1f} TFLOP/s")
    t0 = time.perf_counter()
    for m in p.get("cpu_speed", []):
        if models and m["name"] not in models:
            continue
        try:
            bench.speed_model(m)
        except Exception as exc:
            bench.emit(bench.row(m["name"], m["cfg"].model_args(), "model", error=_error(exc)))
            free()
    for name, args in p["models"]:
        try:
            bench.model(name, args)
        except Exception as exc:  # the reference weights did not fit, say: one row, then go on
            r = bench.row(name, args, "model", error=_error(exc))
            bench.emit(r)
            free()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    _finish(bench.rows)
    return meta, bench.rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _f(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _one_line(r: dict) -> str:
    head = f"{r['shape']:<30} {r['impl']:<11}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    line = (f"{head} {r['median_s'] * 1e3:10.1f} ms/step {r['tokens_per_s']:10.0f} tok/s "
            f"{r['tflops']:8.3g} TFLOP/s MFU {r['mfu']:6.1%} loss0 {r['losses'][0]:.4f}")
    if "peak_mem_gib" in r:
        line += f" {r['peak_mem_gib']:.1f} GiB"
    if "cpu_s" in r:
        line += f" cpu {r['cpu_s'] * 1e3:.0f} ms/step"
    if "pair_speedup_median" in r:
        line += (f" | mixkit speedup {r['pair_speedup_median']:.2f}x per pair "
                 f"[{r['pair_speedup_min']:.2f}-{r['pair_speedup_max']:.2f}], load {r['load_avg']}")
    return line


def _speedup(r: dict) -> str:
    if "pair_speedup_median" in r:
        return f"{r['pair_speedup_median']:.2f} ({r['pair_speedup_min']:.2f}-{r['pair_speedup_max']:.2f})"
    return _f(r.get("mixkit_speedup"), ".2f")


def render_table(rows: list[dict]) -> str:
    header = ["model", "impl", "tokens/step", "ms/step", "p20-p80 ms", "tokens/s", "TFLOP/s", "MFU %", "peak GiB",
              "act. ckpt", "mixkit speedup (x)", "first loss", "loss - mixkit", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        note = r.get("note", "")
        if "error" in r:
            note = "error: " + r["error"]
        elif "skipped" in r:
            note = "skipped: " + r["skipped"]
        timed = "median_s" in r
        cells = [r["model"], r["impl"], r["tokens_per_step"], _f(r.get("median_s", 0) * 1e3, ".1f") if timed else "",
                 f"{r['p20_s'] * 1e3:.1f}-{r['p80_s'] * 1e3:.1f}" if timed else "", _f(r.get("tokens_per_s"), ".0f"),
                 _f(r.get("tflops"), ".3g"), _f(100 * r["mfu"] if timed else None, ".1f"),
                 _f(r.get("peak_mem_gib"), ".1f"), r.get("activation_checkpointing", ""),
                 _speedup(r), _f(r["losses"][0] if timed else None, ".4f"),
                 _f(r.get("loss_diff_vs_mixkit"), ".2e"), note.replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(meta: dict, rows: list[dict]) -> str:
    keys = ["date_utc", "device_name", "driver", "torch", "cuda", "transformers", "commit", "matmul_tflops",
            "seq_len", "grad_accum", "tokens_per_step", "warmup_steps", "timed_steps", "timing", "compile_mode",
            "flops", "cpu_speed_steps", "torch_threads", "omp_num_threads", "load_avg_start", "wall_s"]
    head = "\n".join(f"- {k}: {meta.get(k)}" for k in keys if meta.get(k) is not None)
    return (f"# mixkit training throughput, {meta['device_name']}\n\n{head}\n\n{render_table(rows)}\n\n"
            "MFU = model FLOPs per step (mixkit.train.flops.batch_flops, the same for every row) / median step "
            "time / measured bf16 matmul peak. mixkit speedup = row step time / mixkit step time; for rows timed "
            "interleaved with mixkit's (CPU), the median (min-max) of the per-pair ratios.\n")


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> list[Path]:
    return harness.write_json_and_markdown(path, meta, rows, render_markdown(meta, rows), suffix="_train")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixkit.bench.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="GPU: 4 micro-batches per step, 2 + 3 steps, no compile")
    ap.add_argument("--out", help="results JSON (a .md table is written beside it); a directory picks the name")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per row (after the warm-up)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (GPU 4096; the CPU's "
                                                                "quick-start comparison keeps its own shapes)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches (rows) per optimizer step")
    ap.add_argument("--models", help="comma-separated subset of the plan's models")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the GPU too: checks the code paths fast")
    a = ap.parse_args(argv)
    try:
        meta, rows = run(device=a.device, quick=a.quick, steps=a.steps, seq_len=a.seq_len, grad_accum=a.grad_accum,
                         compile=not a.no_compile, tiny=a.tiny, models=a.models.split(",") if a.models else None)
    except ValueError as exc:
        print(f"mixkit.bench.train: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(render_table(rows))
    if a.out:
        for path in write_results(a.out, meta, rows):
            print(f"wrote {path}")
    # A failing mixkit row fails the command; failing peers are only shown.
    return 1 if any("error" in r and r["impl"] in ("mixkit", "model") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
