"""PPO for Llama 2-Chat's RLHF (Touvron et al. 2023, section 3.2.3), on one
device or under FSDP2 with torchrun.

Each iteration:
1. Rollouts: every rank generates responses to its share of the batch's
   prompts with mixkit.generate (batched decode over the rolling cache, a
   CUDA graph on a GPU). Under FSDP2 the policy's shards are gathered once
   into a plain, unsharded copy for the whole rollout phase and freed after
   it: gathering per decoded token is the ~20x slowdown the paper reports.
2. Scoring: the reward R_c (rule-based, or Llama 2's safety/helpfulness
   combination of reward models, mixkit.train.reward), WHITEN(LOGIT(R_c)) on
   the last response token, -β · (log π_θ - log π_0) on every response token
   (the KL against the frozen initial policy, summed over the response).
3. GAE advantages (γ, λ) from the critic's per-token values.
4. One pass of clipped-surrogate (clip 0.2) policy steps and clipped value
   steps, one optimizer step per mini-batch.

The critic is a separate value model initialised from the reward model
(the helpfulness one; from the initial policy with a zero head when the
reward is rule-based): at the start its value is the reward model's score of
the text so far, an estimate of the return that a value head grown from the
policy lacks, and the value loss's gradients never reach the policy, so no
weighting between the two losses has to be tuned. The cost is a second
trainable model and its optimizer state.

Batches are split across ranks by stride (rank r holds rollouts r, r + W,
...), so mini-batch k of every rank together is mini-batch k of a
one-process run: one process and W ranks do the same math.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..models.generate import check_sampling, generate
from ..models.model import Attention, Transformer
from .config import ConfigError, TrainConfig
from .losses import IGNORE_INDEX, RewardModel, token_logprobs
from .optim import build_optimizer
from .reward import SAFETY_THRESHOLD, Whitening, final_rewards, kl_per_token, llama2_kl_beta
from .trainer import _cast_parameters, _global_norm, apply_fsdp

log = logging.getLogger("mixkit.ppo")


@dataclass
class PPOConfig:
    # Llama 2's settings: AdamW β (0.9, 0.95), eps 1e-5, weight decay 0.1,
    # gradient clip 1.0, constant learning rate 1e-6; batch 512, mini-batch
    # 64, one gradient step per mini-batch; PPO clip 0.2.
    lr: float = 1e-6
    value_lr: float | None = None  # None: lr (the paper states no separate value learning rate)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 512  # rollouts per iteration, over all ranks
    mini_batch_size: int = 64
    ppo_epochs: int = 1  # passes over each batch
    clip: float = 0.2
    value_clip: float = 0.2  # |V - V_old| bound of the clipped value loss; 0 disables
    gamma: float = 1.0  # GAE (not stated in Llama 2; InstructGPT's values)
    lam: float = 0.95
    whiten_advantages: bool = True
    # reward
    kl_beta: float | None = None  # None: 0.01 up to 13B parameters, 0.005 for 34B/70B
    safety_threshold: float = SAFETY_THRESHOLD
    whiten: str = "batch"  # "batch" or "fixed" (then whiten_mean, whiten_std); see reward.Whitening
    whiten_mean: float = 0.0
    whiten_std: float = 1.0
    logit_eps: float = 1e-6
    # rollouts
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    cuda_graph: bool = True  # decode replayed from a CUDA graph (GPU only)
    # run
    iterations: int = 100
    precision: str = "bf16"  # "bf16": bf16 compute over float32 master weights; "fp32"
    loss_chunk_size: int = 4096
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # iterations; 0: never
    checkpoint_dir: str = ""
    fsdp: bool | None = None  # None: FSDP2 when torch.distributed has more than one rank

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.batch_size < 1 or self.mini_batch_size < 1 or self.batch_size % self.mini_batch_size:
            raise ConfigError(f"PPOConfig: batch_size {self.batch_size} must be a positive multiple of "
                              f"mini_batch_size {self.mini_batch_size}")
        if self.ppo_epochs < 1 or self.max_new_tokens < 1 or self.iterations < 0:
            raise ConfigError("PPOConfig: ppo_epochs and max_new_tokens must be >= 1, iterations >= 0")
        if not 0 < self.clip < 1 or self.value_clip < 0:
            raise ConfigError(f"PPOConfig: clip must be in (0, 1) and value_clip >= 0, got {self.clip}, "
                              f"{self.value_clip}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"PPOConfig: precision must be 'bf16' or 'fp32', got {self.precision!r}")
        try:
            check_sampling(self.temperature, self.top_p, self.top_k, "PPOConfig")
            self.whitening()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def whitening(self) -> Whitening:
        return Whitening(self.whiten, self.whiten_mean, self.whiten_std)

    def optimizer_config(self, value: bool = False) -> TrainConfig:
        """The TrainConfig whose AdamW settings build_optimizer reads."""
        lr = self.value_lr if value and self.value_lr is not None else self.lr
        return TrainConfig(lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, warmup_steps=0,
                           grad_clip=self.grad_clip, precision=self.precision)

    def replace(self, **changes) -> "PPOConfig":
        return dataclasses.replace(self, **changes)


# ---- modules ----------------------------------------------------------------------------------------------------

class PolicyLogprobs(nn.Module):
    """A Transformer returning `log π(y_t | ...)` of given response tokens.
    The head lives in this module's forward so that under FSDP2 the output
    weight is gathered when the chunked log-probabilities read it."""

    def __init__(self, model: Transformer, chunk_size: int = 4096):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, tokens: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, entropy: bool = False):
        """tokens (B, S); idx (B, L): positions whose next token is response
        token t; mask (B, L) bool. Returns float32 log-probs (B, L), 0 off the
        mask, and with entropy=True the policy's entropy there (no gradient)."""
        hidden = self.model(tokens, return_hidden=True)
        h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
        target = tokens.gather(1, (idx + 1).clamp(max=tokens.shape[1] - 1))
        labels = torch.where(mask, target, IGNORE_INDEX)
        weight = self.model.output.weight
        logp = token_logprobs(h, weight, labels, self.chunk_size, softcap=self.model.args.final_softcap)
        ent = None
        if entropy:
            with torch.no_grad():
                flat = h.detach().reshape(-1, h.shape[-1])
                parts = []
                for lo in range(0, flat.shape[0], self.chunk_size):
                    logits = torch.matmul(flat[lo:lo + self.chunk_size], weight.t()).float()
                    if self.model.args.final_softcap is not None:
                        logits = self.model.args.final_softcap * torch.tanh(logits / self.model.args.final_softcap)
                    lp = torch.log_softmax(logits, dim=-1)
                    parts.append(-(lp.exp() * lp).sum(-1))
                ent = torch.where(mask, torch.cat(parts).view(mask.shape), 0.0)
        return logp, ent


class ValueModel(nn.Module):
    """The critic: a transformer and a scalar head read at every position;
    value (B, S) float32 of the text up to and including each token."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.score_head = nn.Linear(model.args.dim, 1, bias=False)
        if not model.args.tie_embeddings:
            # the LM head is unused: frozen, it gets no AdamW state (and checkpoints stay consistent)
            model.output.weight.requires_grad_(False)

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "ValueModel":
        vm = cls(copy.deepcopy(rm.model))
        vm.score_head = copy.deepcopy(rm.score_head)
        return vm

    @classmethod
    def from_policy(cls, policy: Transformer) -> "ValueModel":
        vm = cls(copy.deepcopy(policy))
        vm.score_head.to(device=policy.output.weight.device, dtype=policy.output.weight.dtype)
        nn.init.zeros_(vm.score_head.weight)
        return vm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score_head(self.model(tokens, return_hidden=True)).float().squeeze(-1)


# ---- the math ------------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. rewards, values
    (B, L) float32, mask (B, L) bool contiguous from column 0; the value
    after the last token is 0. Returns (advantages, returns = advantages +
    values), both 0 off the mask."""
    rewards, values = rewards.float(), values.float()
    m = mask.float()
    next_values = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (deltas[:, t] + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate, summed over the masked tokens:
    `max(-A · r, -A · clip(r, 1 - clip, 1 + clip))` with r = π_θ / π_old.
    A token whose ratio is past the clip range in its advantage's direction
    contributes a constant, so no gradient. Returns (sum, number of clipped
    tokens)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.where(mask, torch.maximum(unclipped, clipped), 0.0).sum()
    n_clipped = (mask & (clipped > unclipped)).sum()
    return loss, n_clipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """The clipped value loss, summed over the masked tokens:
    `0.5 · max((V - R)², (V_old + clip(V - V_old, -clip, clip) - R)²)`; clip 0: plain squared error."""
    err = (values - returns) ** 2
    if clip > 0:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (v_clipped - returns) ** 2)
    return 0.5 * torch.where(mask, err, 0.0).sum()


def whiten_masked(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of all ranks; 0 off the mask."""
    xd = torch.where(mask, x.double(), 0.0)
    s = torch.stack([xd.sum(), (xd * xd).sum(), mask.sum().double()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(s)
    mean = s[0] / s[2].clamp(min=1)
    std = (s[1] / s[2].clamp(min=1) - mean * mean).clamp(min=0).sqrt()
    return torch.where(mask, (x - mean.float()) / (std.float() + eps), 0.0)


# ---- rollouts --------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One rank's share of an iteration's rollouts. tokens (B, S) prompt +
    response, right-padded; idx/mask (B, L): the position predicting response
    token t, and which t exist; per-token (B, L) float32: old_logp, ref_logp,
    values, rewards, advantages, returns, entropy; per sample (B,): r_c, kl."""
    tokens: torch.Tensor
    idx: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor
    r_c: torch.Tensor
    kl: torch.Tensor
    responses: list[list[int]]


RewardFn = Callable[[list[list[int]], list[list[int]], list[bool]], Any]


def _layout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device):
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    s = max(len(x) for x in seqs)
    tokens = torch.tensor([x + [0] * (s - len(x)) for x in seqs], device=device)
    lens = torch.tensor([len(r) for r in responses], device=device)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=device)
    t = torch.arange(int(lens.max()), device=device)
    mask = t[None] < lens[:, None]
    idx = torch.where(mask, starts[:, None] + t[None], 0)
    return tokens, idx, mask


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class PPOTrainer:
    """Llama 2's PPO. policy: the Transformer to optimise (the frozen π_0 is a
    copy taken here unless `reference` is given); reward_fn(prompts,
    responses, is_safety) -> R_c in [0, 1] per sample (a rule, or
    reward.Llama2Reward); value_model: the critic (default: from the
    policy with a zero head; pass ValueModel.from_reward_model(rm) to start
    from a reward model). Under torchrun all models are sharded with FSDP2.
    log_fn(metrics) gets each iteration's metrics on every rank."""

    def __init__(self, policy: Transformer, reward_fn: RewardFn, cfg: PPOConfig,
                 value_model: ValueModel | None = None, reference: Transformer | None = None,
                 stop: Sequence[int] = (), log_fn: Callable[[dict], None] | None = None):
        self.cfg, self.reward_fn, self.stop = cfg, reward_fn, list(stop)
        self.log_fn = log_fn or self._log
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.fsdp = (self.world > 1) if cfg.fsdp is None else cfg.fsdp
        if self.fsdp and not self.distributed:
            raise RuntimeError("PPOTrainer: fsdp needs torch.distributed initialised (launch with torchrun)")
        if self.world > 1 and not self.fsdp:
            raise RuntimeError(f"PPOTrainer: {self.world} ranks need fsdp")
        if cfg.mini_batch_size % self.world:
            raise ConfigError(f"PPOConfig: mini_batch_size {cfg.mini_batch_size} must be a multiple of the "
                              f"{self.world} ranks")
        self.args = policy.args
        self.beta = cfg.kl_beta if cfg.kl_beta is not None else llama2_kl_beta(_n_params(policy))
        reference = copy.deepcopy(policy) if reference is None else reference
        value_model = ValueModel.from_policy(policy) if value_model is None else value_model
        reference.requires_grad_(False).eval()
        if cfg.precision == "bf16":
            reference = reference.to(torch.bfloat16)  # frozen: no float32 master copy needed, half the memory
        for m in [*policy.modules(), *value_model.modules()]:
            if isinstance(m, Attention):
                m.deterministic = True  # the GPU backward without atomics: exact resume
        self.policy = policy
        self.policy_module = PolicyLogprobs(policy, cfg.loss_chunk_size)
        self.ref_module = PolicyLogprobs(reference, cfg.loss_chunk_size)
        self.value_module = value_model
        if self.fsdp:
            for module in (self.policy_module, self.ref_module, self.value_module):
                apply_fsdp(module, cfg.precision)
        self.device = next(self.policy_module.parameters()).device
        self.policy_optim = build_optimizer(self.policy_module, cfg.optimizer_config())
        self.value_optim = build_optimizer(self.value_module, cfg.optimizer_config(value=True))
        self.policy_params = [p for p in self.policy_module.parameters() if p.requires_grad]
        self.value_params = [p for p in self.value_module.parameters() if p.requires_grad]
        self.iteration = 0

    # ---- helpers ------------------------------------------------------------------------------------------------

    def _compute(self, module: nn.Module):
        if self.cfg.precision == "bf16" and not self.fsdp:
            return _cast_parameters(module, torch.bfloat16)
        return contextlib.nullcontext()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed and self.world > 1:
            dist.all_reduce(t)
        return t

    @contextlib.contextmanager
    def _generation_model(self):
        """The policy for a whole rollout phase. Under FSDP2: every parameter
        all-gathered once into an unsharded copy (in the compute dtype),
        freed when the phase ends."""
        if not self.fsdp:
            with self._compute(self.policy_module):
                yield self.policy
            return
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        with torch.device("meta"):
            gen = Transformer(self.args)
        gen = gen.to(dtype).to_empty(device=self.device)
        gen.tie_weights()
        full = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, p in gen.named_parameters():
                src = full[name]
                p.copy_(src.full_tensor() if hasattr(src, "full_tensor") else src)
        try:
            yield gen.eval()
        finally:
            del gen

    def prompt_indices(self, iteration: int, n_prompts: int) -> list[int]:
        """The batch's prompt indices (all ranks): epoch after epoch through the
        prompts, each epoch in a permutation drawn from (seed, epoch), so a
        resumed run sees the same prompts."""
        b = self.cfg.batch_size
        perms: dict[int, np.ndarray] = {}
        out = []
        for k in range(iteration * b, (iteration + 1) * b):
            epoch, i = divmod(k, n_prompts)
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(n_prompts)
            out.append(int(perms[epoch][i]))
        return out

    # ---- rollouts --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]], is_safety: Sequence[bool] | None = None) -> Rollout:
        """Generate, score and estimate advantages for this rank's prompts."""
        cfg = self.cfg
        prompts = [list(p) for p in prompts]
        is_safety = [False] * len(prompts) if is_safety is None else list(is_safety)
        seed = (cfg.seed * 1_000_003 + self.iteration * 10_007 + self.rank) % (2 ** 63)
        with self._generation_model() as gen:
            responses = generate(gen, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, stop=self.stop, seed=seed,
                                 cuda_graph=cfg.cuda_graph and self.device.type == "cuda")
        tokens, idx, mask = _layout(prompts, responses, self.device)
        r_c = torch.as_tensor(self.reward_fn(prompts, responses, is_safety), dtype=torch.float32,
                              device=self.device).view(-1)
        if r_c.shape[0] != len(prompts) or not bool(((r_c >= 0) & (r_c <= 1)).all()):
            raise ValueError(f"PPO: the reward function must return {len(prompts)} scores in [0, 1], got {r_c}")
        self.policy_module.eval()
        self.value_module.eval()
        # Scored a mini-batch of rows at a time: activations stay those of a training step.
        parts = []
        for lo in range(0, tokens.shape[0], max(cfg.mini_batch_size // self.world, 1)):
            rows = slice(lo, lo + max(cfg.mini_batch_size // self.world, 1))
            t, i, m = self._trim(tokens[rows], idx[rows], mask[rows])
            with self._compute(self.policy_module):
                logp, ent = self.policy_module(t, i, m, entropy=True)
            with self._compute(self.ref_module):
                ref, _ = self.ref_module(t, i, m)
            with self._compute(self.value_module):
                val = torch.where(m, self.value_module(t).gather(1, i), 0.0)
            parts.append((logp, ent, ref, val))
        old_logp, entropy, ref_logp, values = (torch.cat(x) for x in zip(*parts))
        rewards, _ = final_rewards(r_c, old_logp, ref_logp, mask, self.beta, cfg.whitening(), cfg.logit_eps)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten_masked(adv, mask)
        kl = kl_per_token(old_logp, ref_logp, mask).sum(-1)
        return Rollout(tokens, idx, mask, old_logp, ref_logp, values, rewards, adv, returns, entropy, r_c, kl,
                       responses)

    @staticmethod
    def _trim(tokens, idx, mask):
        """Drop the padding columns these rows do not need (the response
        columns stay: per-token tensors of a batch share one width)."""
        length = int(((idx + 1) * mask).max()) + 1
        return tokens[:, :length], idx, mask

    # ---- optimisation -------------------------------------------------------------------------------------

    def _step(self, params: list[torch.Tensor], optimizer, loss: torch.Tensor) -> float:
        """Backward, clip the global gradient norm, step. params: the float32
        master parameters (inside a bf16 cast context the modules show casts)."""
        loss.backward()
        norm = _global_norm(params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def update(self, ro: Rollout) -> dict[str, float]:
        """ppo_epochs passes of one policy and one value optimizer step per
        mini-batch; losses are token means over the global mini-batch."""
        cfg = self.cfg
        n_local = ro.tokens.shape[0]
        m_local = cfg.mini_batch_size // self.world
        if n_local * self.world != cfg.batch_size:
            raise ValueError(f"PPO: {n_local} rollouts on each of {self.world} ranks, batch_size is {cfg.batch_size}")
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # policy loss, value loss, clipped, tokens
        n_steps = 0
        self.policy_module.train()
        self.value_module.train()
        for epoch in range(cfg.ppo_epochs):
            order = (np.arange(n_local) if epoch == 0 else
                     np.random.default_rng([cfg.seed, self.iteration, epoch]).permutation(n_local))
            for lo in range(0, n_local, m_local):
                rows = torch.as_tensor(order[lo:lo + m_local], device=self.device)
                tokens, idx, mask = self._trim(ro.tokens[rows], ro.idx[rows], ro.mask[rows])
                n_tok = self._all_reduce(mask.sum().double()).clamp(min=1)
                scale = (self.world if self.fsdp else 1.0) / n_tok.float()
                with self._compute(self.policy_module):
                    logp, _ = self.policy_module(tokens, idx, mask)
                    pl, clipped = ppo_policy_loss(logp, ro.old_logp[rows], ro.advantages[rows], mask, cfg.clip)
                    self._step(self.policy_params, self.policy_optim, pl * scale)
                with self._compute(self.value_module):
                    v = self.value_module(tokens).gather(1, idx)
                    vl = ppo_value_loss(v, ro.values[rows], ro.returns[rows], mask, cfg.value_clip)
                    self._step(self.value_params, self.value_optim, vl * scale)
                step = torch.stack([pl.detach().double(), vl.detach().double(), clipped.double()])
                step = self._all_reduce(step)
                sums += torch.cat([step[:2] / n_tok, step[2:], n_tok[None]])
                n_steps += 1
        return {"policy_loss": float(sums[0]) / n_steps, "value_loss": float(sums[1]) / n_steps,
                "clip_frac": float(sums[2] / sums[3])}

    def step(self, prompts: Sequence[Sequence[int]], is_safety: Sequence[bool] | None = None) -> dict[str, Any]:
        """One iteration on this rank's prompts: rollouts, then the update."""
        t0 = time.perf_counter()
        ro = self.rollout(prompts, is_safety)
        t1 = time.perf_counter()
        metrics = self.update(ro)
        t2 = time.perf_counter()
        n_tok = ro.mask.sum()
        stats = self._all_reduce(torch.stack([ro.r_c.double().sum(), ro.kl.double().sum(),
                                              (ro.entropy.double() * ro.mask).sum(), n_tok.double(),
                                              torch.tensor(float(len(ro.responses)), dtype=torch.float64,
                                                           device=self.device)]))
        self.iteration += 1
        n = float(stats[4])
        metrics.update(iteration=self.iteration, reward=float(stats[0]) / n, kl=float(stats[1]) / n,
                       entropy=float(stats[2] / stats[3]), response_len=float(stats[3]) / n,
                       rollout_s=t1 - t0, train_s=t2 - t1, rollout_tokens_per_s=float(stats[3]) / max(t1 - t0, 1e-9))
        return metrics

    def fit(self, prompts: Sequence[Sequence[int]], is_safety: Sequence[bool] | None = None,
            iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> list[dict]:
        """Run iterations over a prompt pool (the same on every rank); this
        rank takes rollouts rank, rank + world, ... of each batch. Saves
        checkpoints as configured; returns each iteration's metrics.
        should_stop() is asked after each iteration (all ranks stop together
        when any says so), so a run stops between iterations, where its
        state is a resumable one."""
        cfg = self.cfg
        if not prompts:
            raise ValueError("PPOTrainer.fit: no prompts")
        is_safety = [False] * len(prompts) if is_safety is None else list(is_safety)
        end = cfg.iterations if iterations is None else self.iteration + iterations
        history = []
        while self.iteration < end:
            batch = self.prompt_indices(self.iteration, len(prompts))[self.rank::self.world]
            metrics = self.step([prompts[i] for i in batch], [is_safety[i] for i in batch])
            self.log_fn(metrics)
            history.append(metrics)
            if cfg.checkpoint_every and cfg.checkpoint_dir and self.iteration % cfg.checkpoint_every == 0:
                self.save(f"{cfg.checkpoint_dir}/iter_{self.iteration:08d}")
            if should_stop is not None:
                stop = self._all_reduce(torch.tensor(float(bool(should_stop())), device=self.device))
                if float(stop) > 0:
                    break
        return history

    def _log(self, m: dict):
        if self.rank == 0 and m["iteration"] % max(self.cfg.log_every, 1) == 0:
            log.info("iter %d reward %.4f kl %.4f policy_loss %.4f value_loss %.4f clip_frac %.3f entropy %.3f "
                     "len %.1f", m["iteration"], m["reward"], m["kl"], m["policy_loss"], m["value_loss"],
                     m["clip_frac"], m["entropy"], m["response_len"])

    # ---- run state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Policy and value model with their AdamW states (sharded under
        FSDP2) and the iteration. Every random draw (prompt order, sampling
        seeds, mini-batch order) is a function of (seed, iteration, rank), so
        this is the whole run state."""
        p_model, p_optim = get_state_dict(self.policy_module, self.policy_optim)
        v_model, v_optim = get_state_dict(self.value_module, self.value_optim)
        return {"policy": {"model": p_model, "optim": p_optim}, "value": {"model": v_model, "optim": v_optim},
                "iteration": self.iteration, "world": self.world}

    def save(self, path: str):
        """torch.distributed.checkpoint save (every rank calls it), written as
        `path.partial` and renamed once complete: a save cut short never
        looks like a checkpoint."""
        import os
        import shutil

        partial = f"{path}.partial"
        dcp.save(self.state_dict(), checkpoint_id=partial)
        if self.distributed:
            dist.barrier()
        if self.rank == 0:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(partial, path)
        if self.distributed:
            dist.barrier()

    def load(self, path: str):
        """Resume from `save(path)` with the same world size: the run then
        continues exactly as the saved one would have. The frozen reference
        and the reward models are not saved: rebuild them as at the start."""
        state = self.state_dict()
        dcp.load(state, checkpoint_id=path)
        if int(state["world"]) != self.world:
            raise ValueError(f"PPOTrainer.load: saved with {state['world']} ranks, running on {self.world}")
        set_state_dict(self.policy_module, self.policy_optim, model_state_dict=state["policy"]["model"],
                       optim_state_dict=state["policy"]["optim"])
        set_state_dict(self.value_module, self.value_optim, model_state_dict=state["value"]["model"],
                       optim_state_dict=state["value"]["optim"])
        self.iteration = int(state["iteration"])

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full float32 weights (CPU) under Transformer keys; every rank must call it under FSDP2."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy_module,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in full.items()}


# ---- mixkit ppo --demo --------------------------------------------------------------------------------------------

DEMO_MODEL = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, hidden_dim=256, vocab_size=258,
                  max_seq_len=128)


def _demo_texts(n: int, rng: np.random.Generator) -> list[str]:
    """Synthetic lines of words: lowercase words, and one word in four a group of digits."""
    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789"
    lines = []
    for _ in range(n):
        words = []
        for _ in range(int(rng.integers(6, 12))):
            alphabet, size = (digits, rng.integers(1, 4)) if rng.random() < 0.25 else (letters, rng.integers(2, 6))
            words.append("".join(rng.choice(list(alphabet), size=int(size))))
        lines.append(" ".join(words))
    return lines


def digit_fraction(prompts, responses, is_safety=None) -> list[float]:
    """The demo's rule-based reward in [0, 1]: the fraction of a response's
    tokens that are ASCII digits (a trailing EOS not counted)."""
    out = []
    for r in responses:
        body = [t for t in r if t < 256] or [0]
        out.append(sum(48 <= t <= 57 for t in body) / len(body))
    return out


def demo(iterations: int = 10, pretrain_steps: int = 60, batch_size: int = 32, seed: int = 0,
         quiet: bool = False) -> dict:
    """A self-contained PPO run on the CPU: pretrain a tiny byte-level policy
    on synthetic lines (one word in four is a number), then PPO against a
    rule-based reward, the fraction of digits in the response. Prints
    samples and ends with `ppo demo: reward <before> -> <after>, kl <kl>`:
    the mean reward of the rollouts (sampled at temperature 1) of the first
    and the last iteration, and the last iteration's mean summed KL to the
    initial policy."""
    threads = torch.get_num_threads()
    # Matrices this small run no faster on two threads, and on shared cores
    # two threads per process oversubscribe them: measured on a loaded 2-core
    # machine, a pretraining step took 0.15 s on one thread and 3.2 s on two.
    torch.set_num_threads(1)
    try:
        return _demo(iterations, pretrain_steps, batch_size, seed, quiet)
    finally:
        torch.set_num_threads(threads)


def _demo(iterations: int, pretrain_steps: int, batch_size: int, seed: int, quiet: bool) -> dict:
    from ..data import Component, MixtureLoader, tokenize_texts
    from ..tokenizer import ByteTokenizer
    from .trainer import Trainer

    say = (lambda *a: None) if quiet else print  # noqa: E731
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    texts = _demo_texts(2000, rng)
    docs = tokenize_texts(texts, tok, name="demo")
    tcfg = TrainConfig(model_name="tiny-llama", model=DEMO_MODEL, lr=3e-3, warmup_steps=10, max_steps=pretrain_steps,
                       precision="fp32", seed=seed, weight_decay=0.0, log_every=10 ** 9)
    policy = Transformer(tcfg.model_args()).init_weights(seed)
    loader = MixtureLoader([Component("demo", docs, weight=1.0)], 64, 8, seed=seed, bos_id=tok.bos_id,
                           eos_id=tok.eos_id)
    history = Trainer(policy, tcfg, data=loader).fit()
    say(f"pretrained a {_n_params(policy) / 1e6:.2f}M-parameter byte-level policy for {pretrain_steps} steps: "
        f"loss {history[0]['loss']:.2f} -> {history[-1]['loss']:.2f} ({time.time() - t0:.0f} s)")

    prompts = [[tok.bos_id] + tok.encode(" ".join(t.split()[:2]) + " ") for t in _demo_texts(256, rng)]
    cfg = PPOConfig(lr=1e-3, value_lr=1e-3, weight_decay=0.0, batch_size=batch_size, mini_batch_size=batch_size // 4,
                    max_new_tokens=16, precision="fp32", iterations=iterations, seed=seed)
    trainer = PPOTrainer(policy.eval(), digit_fraction, cfg, stop=[tok.eos_id])

    def show(tag: str):
        with torch.no_grad():
            out = generate(policy, prompts[:3], 16, temperature=1.0, seed=seed, stop=[tok.eos_id])
        for p, r in zip(prompts[:3], out):
            say(f"  {tag}: {tok.decode(p[1:])!r} -> {tok.decode(r)!r}")

    show("before")
    history = []

    def log_fn(m):
        history.append(m)
        if m["iteration"] % 5 == 0 or m["iteration"] == 1:
            say(f"iter {m['iteration']:3d}  reward {m['reward']:.3f}  kl {m['kl']:.3f}  policy_loss "
                f"{m['policy_loss']:+.4f}  value_loss {m['value_loss']:.4f}  clip_frac {m['clip_frac']:.3f}  "
                f"entropy {m['entropy']:.3f}  len {m['response_len']:.1f}")

    trainer.log_fn = log_fn
    trainer.fit(prompts)
    show("after")
    before, after, kl = history[0]["reward"], history[-1]["reward"], history[-1]["kl"]
    say(f"({time.time() - t0:.0f} s)")
    print(f"ppo demo: reward {before:.3f} -> {after:.3f}, kl {kl:.3f}")
    return {"reward_before": before, "reward_after": after, "kl": kl, "seconds": time.time() - t0,
            "history": history}


# ---- mixkit ppo --config FILE --------------------------------------------------------------------------------------

RUN_KEYS = {"policy": str, "tokenizer": str, "prompts": str, "chat": bool, "out_dir": str, "reward": dict,
            "ppo": dict}
RUN_PATHS = ("policy", "prompts", "out_dir")  # and tokenizer unless "byte", [reward] and ppo.checkpoint_dir


def load_ppo_run(path: str | None, overrides: Sequence[str] = ()) -> tuple[dict, PPOConfig]:
    """(run settings, PPOConfig) from a TOML run file and `key=value`
    overrides (`ppo.<field>=`, `reward.<key>=` for the tables):

        policy = "runs/sft/model"        # Hugging Face checkpoint directory (mixkit train / models.save)
        tokenizer = "byte"               # or a directory; default: the policy directory
        prompts = "prompts.jsonl"        # {"prompt": str, "safety": bool (optional)} per line
        chat = true                      # wrap each prompt as a Llama 2 chat turn
        out_dir = "runs/ppo"
        [reward]
        helpfulness = "runs/rm_helpful"  # save_reward_model directories
        safety = "runs/rm_safety"        # optional
        [ppo]                            # PPOConfig fields
        batch_size = 512

    Types are checked first, one ConfigError line per bad key naming the
    file or flag. Relative paths in the file are relative to its directory.
    """
    import typing

    from .config import load_settings, type_errors

    values, sources = load_settings(path, overrides, ("reward", "ppo"))
    unknown = sorted(set(values) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"{sources(unknown[0])}: ppo run file: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known: {list(RUN_KEYS)}")
    errors = type_errors(values, RUN_KEYS, sources)
    errors += type_errors(values["reward"], {"helpfulness": str, "safety": str}, sources, "reward.")
    errors += type_errors(values["ppo"], typing.get_type_hints(PPOConfig), sources, "ppo.")
    if errors:
        raise ConfigError("\n".join(errors))
    for key in ("policy", "prompts"):
        if not values.get(key):
            raise ConfigError(f"{sources(key)}: ppo run file: {key!r} is required")
    reward = values["reward"]
    bad = sorted(set(reward) - {"helpfulness", "safety"})
    if bad or not reward.get("helpfulness"):
        raise ConfigError(f"{sources('reward')}: ppo run file: [reward] needs helpfulness (and optionally safety), "
                          f"got {sorted(reward)}")
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    bad = sorted(set(values["ppo"]) - fields)
    if bad:
        raise ConfigError(f"{sources('ppo.' + bad[0])}: ppo run file: unknown [ppo] key(s) {bad}; known: "
                          f"{sorted(fields)}")
    for key in RUN_PATHS:
        if key in values:
            values[key] = sources.resolve(key, values[key])
    if values.get("tokenizer", "byte") != "byte":
        values["tokenizer"] = sources.resolve("tokenizer", values["tokenizer"])
    for key in reward:
        reward[key] = sources.resolve(f"reward.{key}", reward[key])
    if values["ppo"].get("checkpoint_dir"):
        values["ppo"]["checkpoint_dir"] = sources.resolve("ppo.checkpoint_dir", values["ppo"]["checkpoint_dir"])
    run = {"tokenizer": values["policy"], "chat": True, "out_dir": "runs/ppo", **values}
    return run, PPOConfig(**values["ppo"])


def read_prompts(path: str, tokenizer, chat: bool = True) -> tuple[list[list[int]], list[bool]]:
    """Token ids and safety tags of a prompts .jsonl file ({"prompt": str,
    "safety": bool}); chat=True formats each as a Llama 2 user turn."""
    from ..tokenizer import encode_chat

    prompts, tags = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"{path}:{n}: each line needs a non-empty string 'prompt'")
            if chat:
                ids = encode_chat(tokenizer, [{"role": "user", "content": row["prompt"]}], style="llama2")[0]
            else:
                ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(row["prompt"])
            prompts.append(ids)
            tags.append(bool(row.get("safety", False)))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts, tags


def run_ppo(config: str | None, overrides: Sequence[str] = (), device: str | None = None,
            overwrite: bool = False) -> int:
    """`mixkit ppo --config FILE`: PPO from a run file, on one device or under
    torchrun (FSDP2). Writes out_dir/log.jsonl (one line per iteration),
    checkpoints (ppo.checkpoint_every, default directory out_dir/checkpoints;
    a run resumes from the latest) and the policy with its tokenizer as
    out_dir/model. An out_dir holding another run's outputs and no
    checkpoint raises ConfigError before anything is written, unless
    overwrite replaces them."""
    from .run import distributed

    run, cfg = load_ppo_run(config, overrides)
    with distributed(device) as (rank, world, dev):
        return _run_ppo(run, cfg, rank, world, dev, overwrite)


def _checkpoints(directory: str) -> list[Path]:
    # iter_ and eight digits: an unfinished `.partial` save is not a checkpoint
    return sorted(Path(directory).glob("iter_" + "[0-9]" * 8)) if Path(directory).is_dir() else []


def _run_ppo(run: dict, cfg: PPOConfig, rank: int, world: int, dev: torch.device, overwrite: bool = False) -> int:
    import shutil

    from .. import models
    from .reward import Llama2Reward, load_reward_model
    from .run import _barrier, _tokenizer, claim_run_dir
    from .run_tokenizer import save_model_tokenizer

    out = Path(run["out_dir"])
    if not cfg.checkpoint_dir:
        cfg = cfg.replace(checkpoint_dir=str(out / "checkpoints"))
    latest = [] if overwrite else _checkpoints(cfg.checkpoint_dir)
    if rank == 0 or not overwrite:  # before anything is written; rank 0 alone removes
        removed = claim_run_dir(out, "out_dir", resumable=bool(latest), overwrite=overwrite)
        if overwrite and Path(cfg.checkpoint_dir).is_dir():
            old = sorted(Path(cfg.checkpoint_dir).glob("iter_*"))
            for path in old:
                shutil.rmtree(path)
            removed += [f"{len(old)} checkpoint(s)"] if old else []
        if removed and rank == 0:
            print(f"starting over: removed {', '.join(removed)} from {out}")
    _barrier(world)
    tok = _tokenizer(run["tokenizer"])
    prompts, tags = read_prompts(run["prompts"], tok, bool(run["chat"]))
    rm_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    policy = models.load(run["policy"], dtype=torch.float32, device=dev)
    helpful = load_reward_model(run["reward"]["helpfulness"], dtype=torch.float32, device=dev)
    safety = (load_reward_model(run["reward"]["safety"], dtype=rm_dtype, device=dev)
              if run["reward"].get("safety") else None)
    value = ValueModel.from_reward_model(helpful)  # float32: it is trained
    helpful = helpful.to(rm_dtype)
    for rm in (helpful, safety):
        if rm is not None:
            rm.requires_grad_(False)
            if dist.is_initialized() and world > 1:
                apply_fsdp(rm, cfg.precision)
    reward_fn = Llama2Reward(helpful, safety, cfg.safety_threshold)
    logfile = None

    def log_fn(m):
        if logfile is not None:
            logfile.write(json.dumps({**m, "time": time.time()}) + "\n")
            logfile.flush()
            print(f"iter {m['iteration']} reward {m['reward']:.4f} kl {m['kl']:.4f} policy_loss "
                  f"{m['policy_loss']:+.4f} value_loss {m['value_loss']:.4f} clip_frac {m['clip_frac']:.3f} "
                  f"entropy {m['entropy']:.3f} len {m['response_len']:.1f}", flush=True)

    trainer = PPOTrainer(policy, reward_fn, cfg, value_model=value, stop=[tok.eos_id] if tok.eos_id is not None
                         else [], log_fn=log_fn)
    if latest:
        trainer.load(str(latest[-1]))
        if rank == 0:
            print(f"resumed from {latest[-1]}")
    if rank == 0:  # this run's directory from here on
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"run": run, "ppo": dataclasses.asdict(cfg)}, indent=2,
                                                    default=str) + "\n")
        logfile = open(out / "log.jsonl", "a")
    # Ctrl-C or SIGTERM: finish the iteration under way, save, exit 130.
    import signal

    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        trainer.fit(prompts, tags, should_stop=lambda: bool(stop))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if trainer.iteration < cfg.iterations:
        path = f"{cfg.checkpoint_dir}/iter_{trainer.iteration:08d}"
        trainer.save(path)
        if rank == 0:
            print(f"stopped at iteration {trainer.iteration}: saved {path}")
            logfile.close()
        return 130
    weights = trainer.policy_state_dict()
    if rank == 0:
        full = Transformer(policy.args)
        full.load_state_dict(weights)
        models.save(full, out / "model")
        save_model_tokenizer(tok, out / "model")  # `mixkit generate --model out_dir/model` needs nothing else
        logfile.close()
        print(f"wrote {out / 'log.jsonl'}, {out / 'model'}")
    return 0
