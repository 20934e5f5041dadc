"""Llama 2's reward for RLHF: reward models (save, load, one ranking-loss
step), the safety/helpfulness combination, WHITEN(LOGIT(.)) and the KL
penalty against the frozen initial policy.

Touvron et al. 2023, section 3.2.3:

    R_c(g | p) = R_s(g | p)  if IS_SAFETY(p) or R_s(g | p) < 0.15
                 R_h(g | p)  otherwise
    R̃_c(g | p) = WHITEN(LOGIT(R_c(g | p)))
    R(g | p)    = R̃_c(g | p) - β · D_KL(π_θ(g | p) ‖ π_0(g | p))

R_s and R_h are the reward models' scores through a sigmoid (in (0, 1));
LOGIT undoes the sigmoid, so the whitening acts on the linear scores. The
paper states neither the whitening statistics nor how the KL is estimated;
mixkit's choices are `Whitening` below (default: the rollout batch's own
mean and standard deviation) and the per-token sample estimate
`log π_θ(y_t | ...) - log π_0(y_t | ...)` summed over the response.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from ..models.loading import load, save
from ..models.model import Transformer
from .losses import RewardModel, margins, reward_ranking_loss

SAFETY_THRESHOLD = 0.15  # Llama 2: a response scored below this by the safety model is judged on safety alone
REWARD_HEAD_FILE = "reward_head.safetensors"


def llama2_kl_beta(n_params: int) -> float:
    """β of the KL penalty: 0.01 for Llama 2 7B and 13B, 0.005 for 34B and 70B
    (the paper's two groups; the split is put at 20B parameters)."""
    return 0.01 if n_params <= 20e9 else 0.005


# ---- combination, whitening, KL ----------------------------------------------------------------------------

def combine_rewards(safety: torch.Tensor, helpfulness: torch.Tensor, is_safety: torch.Tensor,
                    threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """R_c: the safety score where the prompt is tagged as safety or the
    safety score is below `threshold`, the helpfulness score elsewhere. All
    scores in [0, 1], shape (B,); is_safety bool (B,)."""
    safety, helpfulness = safety.float(), helpfulness.float()
    if safety.shape != helpfulness.shape or is_safety.shape != safety.shape:
        raise ValueError(f"combine_rewards: shapes differ: safety {tuple(safety.shape)}, helpfulness "
                         f"{tuple(helpfulness.shape)}, is_safety {tuple(is_safety.shape)}")
    use_safety = is_safety.bool() | (safety < threshold)
    return torch.where(use_safety, safety, helpfulness)


def logit(r: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(r / (1 - r)) with r clamped to [eps, 1 - eps] (a score of exactly 0
    or 1, as a rule-based reward gives, would be infinite)."""
    r = r.float().clamp(eps, 1.0 - eps)
    return torch.log(r) - torch.log1p(-r)


@dataclass
class Whitening:
    """The statistics of WHITEN(x) = (x - mean) / (std + eps).

    mode "batch" (default): mean and population standard deviation of x over
    the whole rollout batch (all ranks), recomputed every iteration, so the
    reward fed to PPO has mean 0 and standard deviation 1 whatever the
    reward models' scale. mode "fixed": the given mean and std, e.g. measured
    once on the reward models' scores of a held-out prompt set.
    """
    mode: str = "batch"
    mean: float = 0.0
    std: float = 1.0
    eps: float = 1e-8

    def __post_init__(self):
        if self.mode not in ("batch", "fixed"):
            raise ValueError(f"Whitening: mode must be 'batch' or 'fixed', got {self.mode!r}")
        if self.mode == "fixed" and not self.std > 0:
            raise ValueError(f"Whitening: fixed std must be > 0, got {self.std}")

    def statistics(self, x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) to use for x (B,); in batch mode summed over the ranks of
        `group` when torch.distributed is initialised."""
        if self.mode == "fixed":
            return x.new_tensor(self.mean), x.new_tensor(self.std)
        x = x.double()
        s = torch.stack([x.sum(), (x * x).sum(), x.new_tensor(x.numel())])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(s, group=group)
        mean = s[0] / s[2]
        var = (s[1] / s[2] - mean * mean).clamp(min=0)
        return mean.float(), var.sqrt().float()

    def __call__(self, x: torch.Tensor, group=None) -> torch.Tensor:
        mean, std = self.statistics(x, group)
        return (x.float() - mean) / (std + self.eps)


def kl_per_token(logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate `log π_θ - log π_0` on the response tokens (0 on
    padding), (B, L); its row sum estimates D_KL(π_θ(g | p) ‖ π_0(g | p))."""
    return torch.where(mask, logp_policy.float() - logp_ref.float(), 0.0)


def final_rewards(r_c: torch.Tensor, logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                  beta: float, whitening: Whitening | None = None, logit_eps: float = 1e-6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, L) for PPO and the whitened scores R̃_c (B,):
    -β · KL_t on every response token, plus R̃_c = WHITEN(LOGIT(R_c)) on the
    last one. Their row sum is the paper's R(g | p). mask (B, L) bool, each
    row non-empty and contiguous from column 0."""
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("final_rewards: a response with no tokens")
    white = (whitening or Whitening())(logit(r_c, logit_eps))
    rewards = -beta * kl_per_token(logp_policy, logp_ref, mask)
    last = (lengths - 1).long()
    rewards[torch.arange(rewards.shape[0]), last] += white
    return rewards, white


# ---- reward models --------------------------------------------------------------------------------------

class Llama2Reward:
    """R_c from a helpfulness and an optional safety reward model: each scores
    prompt + response at its last token, a sigmoid maps the score to (0, 1),
    and `combine_rewards` picks per sample. Without a safety model, R_c is
    the helpfulness score. Callable as a PPO reward:
    `(prompts, responses, is_safety) -> R_c (B,)`."""

    def __init__(self, helpfulness: RewardModel, safety: RewardModel | None = None,
                 threshold: float = SAFETY_THRESHOLD):
        self.helpfulness, self.safety, self.threshold = helpfulness, safety, threshold

    @staticmethod
    @torch.no_grad()
    def score(rm: RewardModel, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """sigmoid(rm score) of each sequence, float32 (B,), on the model's device."""
        device = rm.score_head.weight.device
        length = max(len(s) for s in sequences)
        tokens = torch.tensor([list(s) + [0] * (length - len(s)) for s in sequences], device=device)
        return torch.sigmoid(rm(tokens, torch.tensor([len(s) for s in sequences], device=device)))

    def __call__(self, prompts, responses, is_safety=None) -> torch.Tensor:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        helpful = self.score(self.helpfulness, seqs)
        if self.safety is None:
            return helpful
        flags = torch.zeros(len(seqs), dtype=torch.bool) if is_safety is None else torch.as_tensor(is_safety)
        return combine_rewards(self.score(self.safety, seqs), helpful, flags.to(helpful.device), self.threshold)


def reward_model_step(rm: RewardModel, optimizer: torch.optim.Optimizer, chosen: Sequence[Sequence[int]],
                      rejected: Sequence[Sequence[int]], ratings: Sequence[str] | None = None) -> float:
    """One optimizer step of the ranking loss (with Llama 2's margins when
    ratings are given) on pairs of token sequences (prompt + response)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"reward_model_step: {len(chosen)} chosen and {len(rejected)} rejected sequences")
    device = rm.score_head.weight.device
    seqs = list(chosen) + list(rejected)
    length = max(len(s) for s in seqs)
    tokens = torch.tensor([list(s) + [0] * (length - len(s)) for s in seqs], device=device)
    scores = rm(tokens, torch.tensor([len(s) for s in seqs], device=device))
    m = margins(ratings, device=device) if ratings is not None else 0.0
    loss = reward_ranking_loss(scores[:len(chosen)], scores[len(chosen):], m)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def save_reward_model(rm: RewardModel, path, dtype: torch.dtype | None = None, tokenizer=None) -> Path:
    """A Hugging Face directory for the transformer (`models.save`: config.json,
    model.safetensors) plus the scalar head as `score.weight` (the key of
    transformers' *ForSequenceClassification) in reward_head.safetensors;
    config.json records the head file. tokenizer: the one the model scores
    with (the policy's, for PPO), written beside it with its BOS/EOS ids, as
    in every model directory mixkit writes."""
    from safetensors.torch import save_file

    from .run_tokenizer import save_model_tokenizer

    path = save(rm.model, path, dtype)
    if tokenizer is not None:
        save_model_tokenizer(tokenizer, path)
    w = rm.score_head.weight.detach()
    save_file({"score.weight": w.to(dtype or w.dtype).contiguous().cpu()}, str(path / REWARD_HEAD_FILE),
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(mixkit_reward_head=REWARD_HEAD_FILE, num_labels=1)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def load_reward_model(path, dtype: torch.dtype | None = None, device=None) -> RewardModel:
    """A RewardModel from `save_reward_model`'s directory (in eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    head = path / REWARD_HEAD_FILE
    if not head.exists():
        raise FileNotFoundError(f"{path}: no {REWARD_HEAD_FILE}; not a reward model saved by save_reward_model")
    model: Transformer = load(path, dtype=dtype, device=device)
    rm = RewardModel(model)
    w = load_file(str(head))["score.weight"]
    if tuple(w.shape) != (1, model.args.dim):
        raise ValueError(f"{head}: score.weight has shape {tuple(w.shape)}, expected (1, {model.args.dim})")
    rm.score_head.to(device=model.output.weight.device, dtype=model.output.weight.dtype)
    with torch.no_grad():
        rm.score_head.weight.copy_(w)
    return rm.eval()
