"""The training loop: one optimizer step over micro-batches, run state and
torch.distributed.checkpoint save/resume, FSDP2 past one device.

A batch is a dict as produced by mixkit.data: `input_ids` (1, T) int64,
`labels` (1, T) int64 (shifted targets, -100 = no loss), `cu_seqlens` int32
(N + 1,) and `max_seqlen` int (packed documents; attention never crosses
them). Without cu_seqlens, input_ids may be (B, S) rows of one document each.

Precision "bf16": the parameters, gradients and AdamW state stay float32
(master weights); the forward and backward compute with bfloat16 copies of
the parameters, and the cast's backward accumulates the gradients in float32.
Under FSDP2 that is MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=float32); on one device the trainer swaps bf16 casts into the
modules for the forward and backward (mixkit's norm ops take one dtype for
input and weight, so torch.autocast, which leaves the norm weights and the
residual stream in float32, does not apply).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import ops
from ..models.model import Attention, MoE, Transformer
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .flops import batch_flops
from .losses import IGNORE_INDEX, chunked_cross_entropy
from .optim import build_optimizer, lr_at
from .spikes import SpikeDetector

log = logging.getLogger("mixkit.train")


class CausalLMLoss(nn.Module):
    """Transformer plus its training loss: returns (summed next-token
    cross-entropy in float32, number of target tokens, MoE load-balancing loss
    or None). The loss lives in this module's forward so that under FSDP2 the
    output weight is unsharded when the chunked cross-entropy reads it."""

    def __init__(self, model: Transformer, chunk_size: int = 4096, moe_aux: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
        for m in self.moe_layers:
            m.keep_router_logits = moe_aux

    def forward(self, input_ids, labels, cu_seqlens=None, max_seqlen=None):
        hidden = self.model(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_hidden=True)
        ce = chunked_cross_entropy(hidden, self.model.output.weight, labels, self.chunk_size,
                                   softcap=self.model.args.final_softcap)
        aux = None
        kept = [m.router_logits for m in self.moe_layers if m.router_logits is not None]
        if kept:
            # HF's load_balancing_loss_func: one loss over all layers' router logits concatenated.
            m = self.moe_layers[0]
            aux = ops.moe_aux_loss(torch.cat([lg for lg, _ in kept]), torch.cat([ids for _, ids in kept]),
                                   m.num_experts, m.top_k)
            for layer in self.moe_layers:
                layer.router_logits = None
        return ce, aux


@contextlib.contextmanager
def _cast_parameters(module: nn.Module, dtype: torch.dtype):
    """Within the block, every parameter of `module` reads as a `dtype` cast of
    itself (differentiable: gradients reach the float32 parameters), tied
    parameters as one cast. Kept open over the backward, so that activation
    checkpointing recomputes with the same casts."""
    casts: dict[int, torch.Tensor] = {}
    swapped = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.dtype == dtype or not p.is_floating_point():
                continue
            if id(p) not in casts:
                casts[id(p)] = p.to(dtype)
            mod._parameters[name] = casts[id(p)]
            swapped.append((mod, name, p))
    try:
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def apply_fsdp(loss_module: CausalLMLoss, precision: str = "bf16", mesh=None) -> CausalLMLoss:
    """FSDP2: fully_shard each transformer block, then the root (embedding,
    final norm and head with it); bf16 (or float32) parameters in the
    compute, float32 gradient reduce-scatter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = next(loss_module.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in loss_module.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(loss_module, mesh=mesh, mp_policy=mp)
    return loss_module


def _by_mesh(tensors) -> list[list[torch.Tensor]]:
    """Tensors grouped by DTensor mesh: under expert parallelism the experts
    live on the (dp, ep) mesh and the rest on all ranks, and DTensors on
    different meshes cannot meet in one op."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return list(groups.values()) or [[]]


def _global_norm(params) -> torch.Tensor:
    norms = []
    for group in _by_mesh([p.grad for p in params if p.grad is not None]):
        norm = torch.nn.utils.get_total_norm(group, 2.0, error_if_nonfinite=False, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm over all shards
            norm = norm.full_tensor()
        norms.append(norm)
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _doc_lengths(batch) -> list[int]:
    cu = batch.get("cu_seqlens")
    if cu is None:
        b, s = batch["input_ids"].shape
        return [s] * b
    return torch.diff(cu.long()).tolist()


class Trainer:
    """Owns the model (wrapped in CausalLMLoss, sharded with FSDP2 when
    torch.distributed has several ranks), AdamW and the run state.

    model: a Transformer on its device with its initial weights. data: an
    iterable of batches, used by `fit`; if it has state_dict() /
    load_state_dict() its position is checkpointed. eval_fn(trainer) -> dict
    runs every cfg.eval_every steps (on every rank; see eval_loss). log_fn(metrics) receives each step's
    metrics on every rank (default: logging on rank 0 every cfg.log_every).
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, data: Iterable | None = None,
                 eval_fn: Callable[["Trainer"], dict] | None = None,
                 log_fn: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.model = model
        self.data = data
        self.eval_fn = eval_fn
        self.log_fn = log_fn or self._log
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.fsdp = (self.world > 1) if cfg.fsdp is None else cfg.fsdp
        if self.fsdp and not self.distributed:
            raise RuntimeError("Trainer: fsdp needs torch.distributed initialised (launch with torchrun)")
        if self.world > 1 and not self.fsdp:
            raise RuntimeError(f"Trainer: {self.world} ranks need fsdp (data parallelism without it is not "
                               "implemented)")
        model.activation_checkpointing = cfg.activation_checkpointing
        for module in model.modules():
            if isinstance(module, Attention):
                module.deterministic = cfg.deterministic
        self.aux_coef = cfg.aux_loss_coef(model.args)
        self.module = CausalLMLoss(model, cfg.loss_chunk_size, moe_aux=self.aux_coef > 0)
        if cfg.ep > 1:  # Mixtral's experts over ep ranks, FSDP2 over the (world / ep, ep) mesh
            if not self.fsdp:
                raise RuntimeError("Trainer: ep > 1 needs fsdp and torch.distributed (launch with torchrun)")
            from ..parallel.expert import shard_for_training
            shard_for_training(self.module, model, cfg.ep, cfg.precision)
        elif self.fsdp:
            apply_fsdp(self.module, cfg.precision)
        self.device = next(self.module.parameters()).device
        self.optimizer = build_optimizer(self.module, cfg)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.step = 0  # optimizer steps taken or skipped; the schedule's input
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.spikes = SpikeDetector(cfg.spike_factor, cfg.spike_window, cfg.warmup_steps) if cfg.spike_factor else None
        self._data_iter = None
        # crash-safe step_* checkpoints (checkpoint_every, and the run's stop and end saves)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.keep_last) if cfg.checkpoint_dir else None
        self.should_stop: Callable[["Trainer"], bool] | None = None  # checked after every step (on every rank)

    # ---- one step -----------------------------------------------------------------------------------------------

    def _compute_dtype_context(self):
        if self.cfg.precision == "bf16" and not self.fsdp:
            return _cast_parameters(self.module, torch.bfloat16)
        return contextlib.nullcontext()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world > 1:
            dist.all_reduce(t)
        return t

    def train_step(self, micro_batches: Sequence[dict]) -> dict[str, Any]:
        """One optimizer step over the micro-batches (this rank's share under
        FSDP). The cross-entropy is summed over all micro-batches (and ranks)
        and divided once by their total number of target tokens."""
        cfg = self.cfg
        start = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # FLOPs from cu_seqlens before the copy to the device: no device sync
        flops = sum(batch_flops(self.model.args, _doc_lengths(mb)) for mb in micro_batches)
        batches = [{k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}
                   for mb in micro_batches]
        local_tokens = sum(mb["input_ids"].numel() for mb in batches)
        counts = torch.stack([(mb["labels"] != IGNORE_INDEX).sum() for mb in batches]).sum().double()
        stats = self._all_reduce(torch.stack([counts, counts.new_tensor(local_tokens), counts.new_tensor(flops)]))
        n_targets = stats[0].clamp(min=1).float()
        # FSDP averages gradients over ranks; the loss is a global sum over targets.
        ce_scale = self.world / n_targets if self.fsdp else 1.0 / n_targets
        ce_total = torch.zeros((), dtype=torch.float32, device=self.device)
        aux_total = torch.zeros((), dtype=torch.float32, device=self.device)
        with self._compute_dtype_context():
            for i, mb in enumerate(batches):
                if self.fsdp:
                    self.module.set_requires_gradient_sync(i == len(batches) - 1)
                ce, aux = self.module(mb["input_ids"], mb["labels"], mb.get("cu_seqlens"), mb.get("max_seqlen"))
                loss = ce * ce_scale
                if aux is not None and self.aux_coef > 0:
                    # token-weighted mean over micro-batches (and, by FSDP's average, over ranks)
                    frac = mb["input_ids"].numel() / local_tokens
                    loss = loss + self.aux_coef * frac * aux
                    aux_total += frac * aux.detach()
                loss.backward()
                ce_total += ce.detach()
                for layer in self.module.moe_layers:  # set again by activation checkpointing's recompute
                    layer.router_logits = None
        ce_total = self._all_reduce(ce_total)
        aux_total = self._all_reduce(aux_total) / self.world
        loss_value = ce_total / n_targets
        norm = _global_norm(self.params)
        finite = bool(torch.isfinite(loss_value) & torch.isfinite(norm) & torch.isfinite(aux_total))
        spike = self.spikes.check(self.step, float(loss_value)) if finite and self.spikes is not None else None
        if spike is not None:  # numbered as in the log: the step this loss is reported under
            log.warning("step %d: loss spike, %.4f against a median of %.4f over the previous %d steps%s",
                        self.step + 1, float(loss_value), spike, cfg.spike_window,
                        "; update skipped" if cfg.skip_spikes else "")
        applied = finite and not (spike is not None and cfg.skip_spikes)
        if applied:
            if cfg.grad_clip > 0:
                for group in _by_mesh(self.params):
                    torch.nn.utils.clip_grads_with_norm_(group, cfg.grad_clip, norm, foreach=True)
            self.optimizer.step()
        elif finite:
            self.skipped += 1
        else:
            self.skipped += 1
            log.warning("step %d: non-finite loss %s or gradient norm %s; step skipped (%d so far)",
                        self.step, float(loss_value), float(norm), self.skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start  # the bool() above synchronised the device
        metrics = {"step": self.step, "loss": float(loss_value), "grad_norm": float(norm), "lr": lr,
                   "skipped": not applied, "spike": spike is not None, "skipped_total": self.skipped,
                   "tokens": int(stats[1]), "target_tokens": int(stats[0]), "step_time_s": elapsed,
                   "tokens_per_s": float(stats[1]) / elapsed, "model_flops": float(stats[2])}
        if self.module.moe_layers and self.aux_coef > 0:
            metrics["aux_loss"] = float(aux_total)
        if cfg.peak_flops > 0:
            metrics["mfu"] = float(stats[2]) / elapsed / (cfg.peak_flops * self.world)
        return metrics

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[float, int]:
        """(summed cross-entropy in nats, number of target tokens) of one batch,
        in the training precision. Evaluators should go through this (or
        `trainer.module`) rather than `trainer.model`: under FSDP2 only the
        root module's forward gathers the embedding and head."""
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        was_training = self.module.training
        self.module.eval()
        try:
            with self._compute_dtype_context():
                ce, _ = self.module(batch["input_ids"], batch["labels"], batch.get("cu_seqlens"),
                                    batch.get("max_seqlen"))
        finally:
            self.module.train(was_training)
            for layer in self.module.moe_layers:
                layer.router_logits = None
        return float(ce), int((batch["labels"] != IGNORE_INDEX).sum())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The Transformer's full (unsharded, CPU) float32 weights under its own
        keys, for export; every rank must call it under FSDP2."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in full.items()}

    # ---- the loop ------------------------------------------------------------------------------------------------

    def _log(self, metrics: dict):
        if self.rank == 0 and (metrics["step"] % max(self.cfg.log_every, 1) == 0 or metrics["skipped"]):
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            log.info("step %d loss %.4f grad_norm %.3f lr %.3g tok/s %.0f%s", metrics["step"], metrics["loss"],
                     metrics["grad_norm"], metrics["lr"], metrics["tokens_per_s"], mfu)

    def fit(self, steps: int | None = None) -> list[dict]:
        """Run `steps` optimizer steps (default: up to cfg.max_steps), taking
        cfg.grad_accum batches from `data` per step; evaluates and saves
        checkpoints as configured; stops early after a step for which
        `should_stop(trainer)` is true. Returns the metrics of each step."""
        if self.data is None:
            raise ValueError("Trainer.fit: no data (pass data= to Trainer)")
        if self.cfg.checkpoint_every and self.checkpoints is None:
            raise ValueError("Trainer.fit: checkpoint_every needs checkpoint_dir (mixkit train defaults it to the "
                             "run directory)")
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        history = []
        end = self.cfg.max_steps if steps is None else self.step + steps
        while self.step < end:
            metrics = self.train_step([next(self._data_iter) for _ in range(self.cfg.grad_accum)])
            if self.eval_fn is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                metrics.update(self.eval_fn(self))
            self.log_fn(metrics)
            history.append(metrics)
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.checkpoints.save(self, "periodic")
            if self.should_stop is not None and self.should_stop(self):
                break
        return history

    # ---- run state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Model and optimizer (sharded under FSDP2), step counters, and this
        rank's RNG and data-loader state (keyed by rank: they differ per rank)."""
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        local = {"rng": rng}
        if self.data is not None and hasattr(self.data, "state_dict"):
            local["data"] = self.data.state_dict()
        return {"model": model_sd, "optim": optim_sd, "step": self.step, "skipped": self.skipped,
                f"rank{self.rank}": local}

    def save(self, path: str):
        """Save the run state with torch.distributed.checkpoint (all ranks call this)."""
        dcp.save(self.state_dict(), checkpoint_id=path)

    def load(self, path: str):
        """Resume from `save(path)`: afterwards the run continues exactly as the
        saved one would have (same world size)."""
        state = self.state_dict()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        local = state[f"rank{self.rank}"]
        torch.set_rng_state(local["rng"]["cpu"])
        if "cuda" in local["rng"]:
            torch.cuda.set_rng_state(local["rng"]["cuda"], self.device)
        if "data" in local:
            self.data.load_state_dict(local["data"])
        self._data_iter = None
