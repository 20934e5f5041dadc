"""Training for mixkit models (OLMo / Llama 2 recipe): AdamW with warmup and
cosine decay, bf16 compute over float32 master weights, gradient
accumulation and clipping, chunked cross-entropy, SFT / reward model / DPO /
rejection-sampling losses, torch.distributed.checkpoint resume and FSDP2;
Llama 2-Chat's PPO with its combined reward (ppo.py, reward.py)."""
from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .flops import active_params, batch_flops, measure_matmul_peak, visible_pairs
from .losses import (IGNORE_INDEX, LLAMA2_MARGINS, RewardModel, chunked_cross_entropy, dpo_loss, margins,
                     rejection_sample, reward_ranking_loss, sequence_logprobs, sft_example, token_logprobs)
from .optim import build_optimizer, lr_at, param_groups
from .ppo import PPOConfig, PPOTrainer, ValueModel
from .reward import Llama2Reward, Whitening, combine_rewards, load_reward_model, save_reward_model
from .trainer import CausalLMLoss, Trainer, apply_fsdp

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "active_params", "batch_flops",
           "measure_matmul_peak", "visible_pairs", "IGNORE_INDEX", "LLAMA2_MARGINS", "RewardModel",
           "chunked_cross_entropy", "dpo_loss", "margins", "rejection_sample", "reward_ranking_loss",
           "sequence_logprobs", "sft_example", "token_logprobs", "build_optimizer", "lr_at", "param_groups",
           "CausalLMLoss", "Trainer", "apply_fsdp", "PPOConfig", "PPOTrainer", "ValueModel", "Llama2Reward",
           "Whitening", "combine_rewards", "load_reward_model", "save_reward_model"]
