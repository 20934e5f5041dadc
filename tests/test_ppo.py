"""PPO and Llama 2's reward (mixkit.train.ppo, mixkit.train.reward) against
hand computations and plain-Python references; one iteration on one process
and on two gloo ranks under FSDP2; exact resume; the demo's reward rising.

Run as `torchrun --nproc_per_node 2 tests/test_ppo.py OUT.json` this file is
also the FSDP2 worker of test_fsdp2_ppo_matches_one_process.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixkit.models import Transformer
from mixkit.train import ConfigError, RewardModel, TrainConfig, build_optimizer
from mixkit.train.ppo import (PPOConfig, PPOTrainer, ValueModel, digit_fraction, gae, load_ppo_run, ppo_policy_loss,
                              ppo_value_loss)
from mixkit.train.reward import (Llama2Reward, Whitening, combine_rewards, final_rewards, kl_per_token,
                                 llama2_kl_beta, load_reward_model, logit, reward_model_step, save_reward_model)

HERE = Path(__file__).parent
TINY = TrainConfig(model_name="tiny-llama", model=dict(vocab_size=258, dim=64, head_dim=32, hidden_dim=96,
                                                        max_seq_len=64)).model_args()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is as fast as two, and far faster when other
    # processes share the cores (see ppo.demo).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(seed: int = 0) -> Transformer:
    return Transformer(TINY).init_weights(seed, std=0.1)


# ---- reward combination -----------------------------------------------------------------------------------------

def test_combined_reward_and_whitening_by_hand():
    safety = torch.tensor([0.90, 0.10, 0.50, 0.15, 0.149])
    helpful = torch.tensor([0.20, 0.80, 0.70, 0.90, 0.60])
    tagged = torch.tensor([True, False, False, False, False])
    r_c = combine_rewards(safety, helpful, tagged)
    # tagged -> safety; 0.10 < 0.15 -> safety; 0.50 -> helpful; exactly 0.15 is not below -> helpful; 0.149 -> safety
    expected = [0.90, 0.10, 0.70, 0.90, 0.149]
    assert r_c.tolist() == pytest.approx(expected)
    logits = [math.log(r / (1 - r)) for r in expected]
    mean, std = statistics.fmean(logits), statistics.pstdev(logits)
    white = Whitening()(logit(r_c))
    assert white.tolist() == pytest.approx([(x - mean) / std for x in logits], rel=1e-5)
    fixed = Whitening("fixed", mean=0.5, std=2.0)(logit(r_c))
    assert fixed.tolist() == pytest.approx([(x - 0.5) / 2.0 for x in logits], rel=1e-5)
    assert combine_rewards(safety, helpful, tagged, threshold=0.05).tolist() == pytest.approx(
        [0.90, 0.80, 0.70, 0.90, 0.60])
    # a rule's exact 0 and 1 stay finite
    assert torch.isfinite(logit(torch.tensor([0.0, 1.0]))).all()
    with pytest.raises(ValueError, match="mode"):
        Whitening("running")
    with pytest.raises(ValueError, match="shapes"):
        combine_rewards(safety, helpful[:2], tagged)


def test_kl_beta_defaults():
    assert llama2_kl_beta(6.7e9) == 0.01 and llama2_kl_beta(13e9) == 0.01
    assert llama2_kl_beta(34e9) == 0.005 and llama2_kl_beta(70e9) == 0.005
    trainer = PPOTrainer(_tiny(), digit_fraction, PPOConfig(precision="fp32", batch_size=4, mini_batch_size=2))
    assert trainer.beta == 0.01
    assert PPOTrainer(_tiny(), digit_fraction, PPOConfig(kl_beta=0.2, batch_size=4, mini_batch_size=2)).beta == 0.2


# ---- KL penalty and GAE against plain Python --------------------------------------------------------------

def test_kl_penalty_and_gae_match_python_reference():
    # two responses, of 4 and 2 tokens
    logp = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 0.0, 0.0]]
    ref = [[-1.5, -0.4, -1.0, -0.3], [-0.3, -2.0, 0.0, 0.0]]
    values = [[0.2, -0.1, 0.4, 0.3], [0.5, 0.1, 0.0, 0.0]]
    lengths, r_c, beta, gamma, lam = [4, 2], [0.8, 0.3], 0.05, 0.9, 0.8
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    rewards, white = final_rewards(torch.tensor(r_c), torch.tensor(logp), torch.tensor(ref), mask, beta,
                                   Whitening("fixed", mean=0.1, std=2.0))
    adv, ret = gae(rewards, torch.tensor(values), mask, gamma, lam)
    for i, n in enumerate(lengths):
        kl = [logp[i][t] - ref[i][t] for t in range(n)]
        assert float(kl_per_token(torch.tensor(logp), torch.tensor(ref), mask)[i].sum()) == pytest.approx(sum(kl))
        w = (math.log(r_c[i] / (1 - r_c[i])) - 0.1) / 2.0
        assert float(white[i]) == pytest.approx(w, rel=1e-6)
        r = [-beta * k for k in kl]
        r[-1] += w
        assert rewards[i, :n].tolist() == pytest.approx(r, rel=1e-6)
        assert float(rewards[i].sum()) == pytest.approx(w - beta * sum(kl), rel=1e-6)  # the paper's R(g | p)
        a, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            nxt = values[i][t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nxt - values[i][t] + gamma * lam * running
            a[t] = running
        assert adv[i, :n].tolist() == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx([a[t] + values[i][t] for t in range(n)], rel=1e-5, abs=1e-6)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


# ---- the PPO losses -----------------------------------------------------------------------------------------

def test_ppo_policy_loss_gradients_and_clipping():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=gen) - 2
    logp = (old + 0.4 * torch.randn(3, 5, generator=gen)).requires_grad_()
    adv = torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    loss, n_clipped = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    loss.backward()
    # direct: per token, -min(r A, clip(r) A), differentiated by autograd one token at a time
    ref_grad = torch.zeros_like(logp)
    ref_loss, ref_clipped = 0.0, 0
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                continue
            x = logp[i, t].detach().clone().requires_grad_()
            r = torch.exp(x - old[i, t])
            a = float(adv[i, t])
            surrogate = torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a)
            (-surrogate).backward()
            ref_grad[i, t] = x.grad
            ref_loss += -float(surrogate)
            outside = (a > 0 and float(r) > 1.2) or (a < 0 and float(r) < 0.8)
            ref_clipped += outside
            if outside:  # past the clip range in the advantage's direction: no gradient
                assert logp.grad[i, t] == 0
            else:
                assert logp.grad[i, t] != 0
    torch.testing.assert_close(logp.grad, ref_grad)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert int(n_clipped) == ref_clipped > 0 and ref_clipped < int(mask.sum())


def test_ppo_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0, 0.05]])
    v = torch.tensor([[0.5, 0.1, -0.5, 0.3]], requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss = ppo_value_loss(v, old, ret, mask, clip=0.2)
    loss.backward()
    # token 0: V moved 0.5 past the clip toward R; the clipped error (0.8^2) is larger, and constant in V
    # token 1: inside the range; token 2: clipped branch wins again; token 3: unclipped error larger
    expected = 0.5 * (0.8 ** 2 + 0.9 ** 2 + 0.8 ** 2 + 0.25 ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, 0.1 - 1.0, 0.0, 0.25]]))
    assert float(ppo_value_loss(v, old, ret, mask, clip=0.0)) == pytest.approx(
        0.5 * (0.25 + 0.81 + 0.25 + 0.0625), rel=1e-6)


# ---- reward models ------------------------------------------------------------------------------------------

def test_reward_model_ranking_save_load(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(_tiny())
    opt = build_optimizer(rm, TrainConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0))
    chosen = [[256] + list(b"12345"), [256] + list(b"9 8 7")]
    rejected = [[256] + list(b"abcde"), [256] + list(b"x y z")]
    losses = [reward_model_step(rm, opt, chosen, rejected, ["better", "significantly_better"]) for _ in range(15)]
    assert losses[-1] < losses[0]
    path = save_reward_model(rm, tmp_path / "rm")
    loaded = load_reward_model(path)
    seqs = chosen + rejected
    torch.testing.assert_close(Llama2Reward.score(loaded, seqs), Llama2Reward.score(rm, seqs))
    # the Llama 2 combination with a helpfulness and a safety model
    reward = Llama2Reward(helpfulness=loaded, safety=rm, threshold=0.15)
    both = reward([s[:1] for s in seqs], [s[1:] for s in seqs], [True, False, False, False])
    s = Llama2Reward.score(rm, seqs)
    h = Llama2Reward.score(loaded, seqs)
    torch.testing.assert_close(both, combine_rewards(s, h, torch.tensor([True, False, False, False])))
    (path / "reward_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="reward_head"):
        load_reward_model(path)


# ---- one iteration, resume --------------------------------------------------------------------------------------

def _config(**kw) -> PPOConfig:
    base = dict(lr=3e-3, value_lr=3e-3, weight_decay=0.0, batch_size=8, mini_batch_size=4, max_new_tokens=6,
                precision="fp32", seed=1, temperature=1.0, iterations=3)
    return PPOConfig(**{**base, **kw})


def _prompts():
    return [[256] + list(f"q{i} ".encode()) for i in range(11)]


def _trainer(cfg: PPOConfig, seed: int = 0) -> PPOTrainer:
    torch.manual_seed(seed)
    policy = _tiny(0)
    rm = RewardModel(_tiny(5))
    torch.nn.init.normal_(rm.score_head.weight, std=0.1, generator=torch.Generator().manual_seed(6))
    return PPOTrainer(policy, digit_fraction, cfg, value_model=ValueModel.from_reward_model(rm), stop=[257])


def test_ppo_iteration_and_exact_resume(tmp_path):
    cfg = _config()
    straight = _trainer(cfg)
    history = straight.fit(_prompts())
    keys = {"reward", "kl", "policy_loss", "value_loss", "clip_frac", "entropy", "response_len"}
    assert keys <= set(history[0]) and all(math.isfinite(m[k]) for m in history for k in keys)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and history[-1]["kl"] != 0  # π_θ = π_0 at first
    assert 0 <= history[0]["clip_frac"] <= 1 and 1 <= history[0]["response_len"] <= 6

    first = _trainer(cfg)
    first.fit(_prompts(), iterations=1)
    first.save(str(tmp_path / "ckpt"))
    resumed = _trainer(cfg, seed=9)
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.iteration == 1
    tail = resumed.fit(_prompts())
    drop = ("rollout_s", "train_s", "rollout_tokens_per_s")
    strip = lambda m: {k: v for k, v in m.items() if k not in drop}  # noqa: E731
    assert [strip(m) for m in tail] == [strip(m) for m in history[1:]]
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    # a stop request ends the run between iterations
    stopped = _trainer(cfg)
    assert len(stopped.fit(_prompts(), should_stop=lambda: True)) == 1 and stopped.iteration == 1


def test_bf16_compute_keeps_float32_master_weights():
    trainer = PPOTrainer(_tiny(), digit_fraction, _config(precision="bf16", iterations=1))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    (m,) = trainer.fit(_prompts())
    assert all(math.isfinite(m[k]) for k in ("reward", "kl", "policy_loss", "value_loss", "entropy"))
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.parameters()))


def test_bad_input():
    with pytest.raises(ConfigError, match="multiple"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    with pytest.raises(ConfigError, match="clip"):
        PPOConfig(clip=1.5)
    with pytest.raises(ConfigError, match="mode"):
        PPOConfig(whiten="median")
    trainer = PPOTrainer(_tiny(), lambda p, r, s: [2.0] * len(r), _config())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        trainer.rollout(_prompts()[:2])
    with pytest.raises(ValueError, match="no prompts"):
        trainer.fit([])


def test_ppo_run_file(tmp_path):
    from mixkit import models
    from mixkit.cli import main

    models.save(_tiny(), tmp_path / "policy")
    save_reward_model(RewardModel(_tiny(3)), tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"say {i}", "safety": i == 0})
                                                      for i in range(5)) + "\n")
    run = tmp_path / "ppo.toml"
    run.write_text(f'policy = "{tmp_path / "policy"}"\ntokenizer = "byte"\nprompts = "{tmp_path / "prompts.jsonl"}"\n'
                   f'out_dir = "{tmp_path / "out"}"\n[reward]\nhelpfulness = "{tmp_path / "rm"}"\n'
                   f'safety = "{tmp_path / "rm"}"\n[ppo]\nbatch_size = 4\nmini_batch_size = 2\n'
                   'max_new_tokens = 4\niterations = 2\nprecision = "fp32"\ncheckpoint_every = 1\n')
    assert main(["ppo", "--config", str(run)]) == 0
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2]
    assert models.load(tmp_path / "out" / "model").args == TINY
    # a rerun resumes from the last checkpoint (iteration 2) and has nothing left to do
    assert main(["ppo", "--config", str(run), "--set", "ppo.iterations=3"]) == 0
    assert [json.loads(x)["iteration"] for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ConfigError, match="unknown"):
        load_ppo_run(str(run), ["ppo.nope=1"])
    with pytest.raises(ConfigError, match="helpfulness"):
        load_ppo_run(str(run), ["reward.helpfulness="])


# ---- FSDP2 -------------------------------------------------------------------------------------------------------

def _fsdp_config() -> PPOConfig:
    # greedy rollouts: one process and two ranks then sample the same responses
    return _config(temperature=0.0, iterations=2)


def _gloo_unavailable() -> str | None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this torch build"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_gloo_unavailable() is not None, reason=str(_gloo_unavailable()))
def test_fsdp2_ppo_matches_one_process(tmp_path):
    import mixkit

    out = tmp_path / "ppo.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(mixkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    trainer = _trainer(_fsdp_config())
    history = trainer.fit(_prompts())
    assert len(result["history"]) == len(history) == 2
    assert result["gathers"] == result["expected_gathers"]
    for got, ref in zip(result["history"], history):
        for k in ("reward", "kl", "policy_loss", "value_loss", "clip_frac", "entropy", "response_len"):
            assert got[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    weights = {k: torch.tensor(v) for k, v in result["weights"].items()}
    for name, p in trainer.policy.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=1e-4, atol=1e-6)


def _fsdp_worker(out_path: str):
    import torch.distributed as dist

    from torch.distributed.tensor import DTensor

    from mixkit.parallel import exit_rank

    dist.init_process_group("gloo")
    trainer = _trainer(_fsdp_config())
    assert trainer.fsdp and trainer.world == 2
    # Count explicit all-gathers: generation must gather each policy parameter
    # once per rollout phase (not once per decoded token).
    gathers = []
    full_tensor = DTensor.full_tensor

    def counting(self, *a, **kw):
        if self.dim() > 0:  # not the gradient-norm scalars
            gathers.append(1)
        return full_tensor(self, *a, **kw)

    DTensor.full_tensor = counting
    try:
        history = trainer.fit(_prompts())
    finally:
        DTensor.full_tensor = full_tensor
    n_params = len(list(trainer.policy.parameters()))
    weights = trainer.policy_state_dict()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"history": history, "weights": {k: v.tolist() for k, v in weights.items()},
                       "gathers": len(gathers), "expected_gathers": len(history) * n_params}, f)
    exit_rank(0)  # barrier, destroy_process_group, os._exit: see its docstring


# ---- the demo -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_reward_rises(capsys):
    from mixkit.train.ppo import demo

    result = demo(quiet=True)  # the defaults: what `mixkit ppo --demo` runs
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"ppo demo: reward {result['reward_before']:.3f} -> {result['reward_after']:.3f}, "
                    f"kl {result['kl']:.3f}")
    assert result["reward_after"] >= result["reward_before"] + 0.3
    assert math.isfinite(result["kl"]) and result["kl"] > 0


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
