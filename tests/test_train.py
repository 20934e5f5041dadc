"""mixkit.train on tiny models on the CPU: losses against hand computations
and F.cross_entropy, the trainer's accumulation, clipping, non-finite skip,
exact resume and configuration.

Tolerances: everything runs in float32 on the CPU. Chunked and full
cross-entropy sum the same float32 terms in a different order, so they agree
to a few ulp of the loss (rtol 1e-6) and the gradients to float32 matmul
rounding (atol 1e-6 on values of order 1e-3). Gradient accumulation against
one packed batch changes only the summation order of the gradients (per
micro-batch, then added) and the matmul shapes: 1e-5 relative after AdamW
steps, whose update g / sqrt(v) is insensitive to the gradient's scale.
Resume is compared with ==: the CPU path is deterministic.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mixkit.models import Transformer
from mixkit.ops import moe_aux_loss
from mixkit.train import (IGNORE_INDEX, LLAMA2_MARGINS, CausalLMLoss, ConfigError, RewardModel, Trainer, TrainConfig,
                          active_params, batch_flops, chunked_cross_entropy, config_from_dict, dpo_loss, load_config,
                          lr_at, margins, param_groups, rejection_sample, reward_ranking_loss, sequence_logprobs,
                          sft_example, token_logprobs, visible_pairs)

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, dim=64, head_dim=32, hidden_dim=96)


def config(name="tiny-llama", **kw) -> TrainConfig:
    base = dict(model_name=name, model=dict(SMALL), lr=3e-3, warmup_steps=3, max_steps=40, precision="fp32",
                loss_chunk_size=24)
    base.update(kw)
    return TrainConfig(**base)


def make_model(cfg: TrainConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg.model_args()).init_weights(seed)


def packed_batch(docs: list[torch.Tensor]) -> dict:
    """The mixkit.data format: documents packed into one row, shifted labels,
    -100 on each document's last token."""
    ids = torch.cat(docs)[None]
    labels = torch.full_like(ids, IGNORE_INDEX)
    cu = [0]
    for d in docs:
        labels[0, cu[-1]:cu[-1] + len(d) - 1] = d[1:]
        cu.append(cu[-1] + len(d))
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "max_seqlen": max(len(d) for d in docs)}


def random_docs(gen, lengths):
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


class SyntheticLoader:
    """A stateful loader of packed random documents: batch i is a function of
    (seed, i), and state_dict() is its position."""

    def __init__(self, seed=0, lengths=(13, 22, 9)):
        self.seed, self.lengths, self.index = seed, lengths, 0

    def __iter__(self):
        return self

    def __next__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.index)
        self.index += 1
        return packed_batch(random_docs(gen, self.lengths))

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


# ---- chunked cross-entropy --------------------------------------------------------------------------------------

def test_chunked_cross_entropy_matches_full_logits():
    gen = torch.Generator().manual_seed(0)
    n, d, v = 45, 16, 37
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::4] = IGNORE_INDEX
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    gh_ref, gw_ref = torch.autograd.grad(ref * 0.7, (hidden, weight))
    for chunk in (1, 8, 13, 45, 100):
        ours = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        gh, gw = torch.autograd.grad(ours * 0.7, (hidden, weight))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    mean = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, reduction="mean")
    torch.testing.assert_close(mean, F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX))
    logp = token_logprobs(hidden, weight, labels, chunk_size=8)
    ref_logp = torch.where(labels != IGNORE_INDEX, -F.cross_entropy(hidden @ weight.t(), labels.clamp(min=0),
                                                                     reduction="none"), 0.0)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    g_ref = torch.autograd.grad(ref_logp.sum(), hidden)[0]
    torch.testing.assert_close(torch.autograd.grad(logp.sum(), hidden)[0], g_ref, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_cross_entropy_never_holds_full_logits():
    n, d, v, chunk = 512, 8, 1000, 64
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    for fn in (lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk),
               lambda: token_logprobs(hidden, weight, labels, chunk_size=chunk).sum()):
        with _LargestTensor() as probe:
            fn().backward()
        # The largest tensor is one (chunk, vocab) block or the (vocab, dim) weight gradient, never (n, vocab).
        assert probe.largest == max(chunk * v, v * d) < n * v
    with _LargestTensor() as probe:  # the probe does see full logits when they exist
        F.cross_entropy(hidden @ weight.t(), labels).backward()
    assert probe.largest == n * v


# ---- SFT, reward model, DPO, rejection sampling -------------------------------------------------------------

def test_sft_loss_covers_answer_tokens_only():
    prompt, answer = [5, 9, 17, 3, 44], [8, 2, 61]
    ids, labels = sft_example(prompt, answer)
    assert labels.tolist() == [-100, -100, -100, -100, 8, 2, 61, -100]
    cfg = config()
    model = make_model(cfg)
    hidden = model(ids[None], return_hidden=True).detach().requires_grad_(True)
    loss = chunked_cross_entropy(hidden, model.output.weight, labels[None], chunk_size=3, reduction="mean")
    # by hand: mean CE of the answer tokens, predicted from the last prompt token on
    logits = model(ids[None])[0]
    by_hand = sum(-torch.log_softmax(logits[len(prompt) - 1 + j], -1)[a] for j, a in enumerate(answer)) / 3
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)
    grad = torch.autograd.grad(loss, hidden)[0][0]
    answer_pos = torch.zeros(len(ids), dtype=torch.bool)
    answer_pos[len(prompt) - 1:-1] = True
    assert (grad[~answer_pos] == 0).all() and (grad[answer_pos].abs().sum(-1) > 0).all()
    # the prompt's own next-token targets never enter: a different prompt continuation gives the same loss
    _, labels2 = sft_example(prompt, answer)
    labels2[:len(prompt) - 1] = torch.tensor(prompt[1:])  # as if the prompt were trained on
    assert chunked_cross_entropy(hidden, model.output.weight, labels2[None]) != \
        chunked_cross_entropy(hidden, model.output.weight, labels[None])


def test_reward_ranking_loss_by_hand():
    assert LLAMA2_MARGINS == {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
                              "negligibly_better": 0.0, "unsure": 0.0}
    chosen = torch.tensor([2.0, 0.5, -1.0, 0.3])
    rejected = torch.tensor([1.0, 0.5, -0.2, 0.1])
    m = margins(["significantly_better", "better", "slightly_better", "unsure"])
    by_hand = [-math.log(1 / (1 + math.exp(-(c - r - mm)))) for c, r, mm in
               zip(chosen.tolist(), rejected.tolist(), [1.0, 2 / 3, 1 / 3, 0.0])]
    torch.testing.assert_close(reward_ranking_loss(chosen, rejected, m), torch.tensor(sum(by_hand) / 4))
    with pytest.raises(ValueError, match="much_better"):
        margins(["much_better"])


def test_reward_model_scores_last_real_token():
    cfg = config()
    rm = RewardModel(make_model(cfg))
    torch.nn.init.normal_(rm.score_head.weight, std=0.1)
    gen = torch.Generator().manual_seed(1)
    a, b = random_docs(gen, [7, 11])
    padded = torch.zeros(2, 11, dtype=torch.int64)
    padded[0, :7], padded[1] = a, b
    scores = rm(padded, torch.tensor([7, 11]))
    by_hand = torch.stack([rm.score_head(rm.model(d[None], return_hidden=True)[0, -1])[0] for d in (a, b)])
    torch.testing.assert_close(scores, by_hand, rtol=1e-5, atol=1e-6)
    packed = packed_batch([a, b])
    torch.testing.assert_close(rm(packed["input_ids"], cu_seqlens=packed["cu_seqlens"], max_seqlen=11), by_hand,
                               rtol=1e-5, atol=1e-6)


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    beta = 0.1
    by_hand = [math.log1p(math.exp(-beta * ((a - c) - (b - d)))) for a, b, c, d in
               zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta), torch.tensor(sum(by_hand) / 2))


def test_dpo_with_sequence_logprobs():
    cfg = config()
    policy, ref = make_model(cfg, seed=0), make_model(cfg, seed=1).requires_grad_(False)
    chosen_ids, chosen_labels = sft_example([3, 4, 5], [6, 7])
    rejected_ids, rejected_labels = sft_example([3, 4, 5], [9, 1, 2])

    def logp_by_hand(model, ids, labels):
        logits = model(ids[None])[0]
        return sum(torch.log_softmax(logits[t], -1)[labels[t]] for t in range(len(ids)) if labels[t] >= 0)

    # packed: chosen and rejected as two documents of one row
    ids = torch.cat([chosen_ids, rejected_ids])[None]
    labels = torch.cat([chosen_labels, rejected_labels])[None]
    cu = torch.tensor([0, len(chosen_ids), ids.shape[1]], dtype=torch.int32)
    pol = sequence_logprobs(policy, ids, labels, cu_seqlens=cu, chunk_size=4)
    with torch.no_grad():
        rf = sequence_logprobs(ref, ids, labels, cu_seqlens=cu)
    hand = [logp_by_hand(m, i, lab) for m in (policy, ref) for i, lab in
            ((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))]
    torch.testing.assert_close(pol, torch.stack(hand[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rf, torch.stack(hand[2:]), rtol=1e-5, atol=1e-5)
    loss = dpo_loss(pol[:1], pol[1:], rf[:1], rf[1:], beta=0.5)
    torch.testing.assert_close(loss, -F.logsigmoid(0.5 * ((hand[0] - hand[2]) - (hand[1] - hand[3]))),
                               rtol=1e-5, atol=1e-6)
    loss.backward()
    assert policy.output.weight.grad is not None and ref.output.weight.grad is None


def test_rejection_sampling_keeps_best_score():
    cfg = config()
    policy = make_model(cfg, seed=0)
    with torch.no_grad():
        policy.output.weight.mul_(20)  # peaky enough that samples differ, random enough that they do
    rm = RewardModel(make_model(cfg, seed=2))
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    prompt = [1, 2, 3, 4]
    best, score, samples = rejection_sample(policy, rm, prompt, k=4, max_new_tokens=5, temperature=1.0, seed=7)
    assert len(samples) == 4 and len({tuple(s) for s, _ in samples}) > 1
    with torch.no_grad():
        rescored = [float(rm(torch.tensor([prompt + s]))[0]) for s, _ in samples]
    i = max(range(4), key=lambda j: rescored[j])
    assert best == samples[i][0] and score == pytest.approx(rescored[i], rel=1e-5)


# ---- trainer ----------------------------------------------------------------------------------------------------

def test_loss_falls():
    cfg = config(lr=1e-2, warmup_steps=5, max_steps=30)
    gen = torch.Generator().manual_seed(0)
    data = [packed_batch(random_docs(gen, [16, 16])) for _ in range(2)]  # memorisable
    trainer = Trainer(make_model(cfg), cfg)
    losses = [trainer.train_step([data[i % 2]])["loss"] for i in range(30)]
    assert losses[0] > 4.5  # ~ln(128) from a random init
    assert max(losses[-3:]) < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_resume_is_exact(name, tmp_path):
    cfg = config(name, grad_accum=2, max_steps=6)

    def fresh():
        torch.manual_seed(123)
        return Trainer(make_model(cfg), cfg, data=SyntheticLoader())

    straight = [m["loss"] for m in fresh().fit(6)]
    first = fresh()
    head = [m["loss"] for m in first.fit(3)]
    first.save(str(tmp_path / "ckpt"))
    del first
    torch.manual_seed(999)  # the RNG state must come from the checkpoint
    second = Trainer(make_model(cfg, seed=5), cfg, data=SyntheticLoader())
    second.load(str(tmp_path / "ckpt"))
    assert second.step == 3 and second.data.index == 6
    tail = [m["loss"] for m in second.fit(3)]
    assert head + tail == straight


def test_gradient_accumulation_matches_one_batch():
    gen = torch.Generator().manual_seed(3)
    docs = random_docs(gen, [19, 30])
    results = []
    for micro in ([packed_batch(docs[:1]), packed_batch(docs[1:])], [packed_batch(docs)]):
        cfg = config(grad_accum=len(micro), grad_clip=0.0)
        trainer = Trainer(make_model(cfg), cfg)
        losses = [trainer.train_step(micro)["loss"] for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in trainer.params]))
    (acc_losses, acc_params), (one_losses, one_params) = results
    torch.testing.assert_close(acc_losses, one_losses, rtol=1e-5, atol=0)
    for a, b in zip(acc_params, one_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_reports_pre_clip_norm():
    cfg = config(grad_clip=1e-3)
    trainer = Trainer(make_model(cfg), cfg)
    batch = packed_batch(random_docs(torch.Generator().manual_seed(0), [20, 12]))
    ce, _ = trainer.module(batch["input_ids"], batch["labels"], batch["cu_seqlens"], batch["max_seqlen"])
    (ce / (batch["labels"] >= 0).sum()).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in trainer.params])
    trainer.optimizer.zero_grad()
    seen = {}
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.update(
        norm=torch.nn.utils.get_total_norm([p.grad for p in trainer.params])))
    metrics = trainer.train_step([batch])
    assert metrics["grad_norm"] == pytest.approx(float(expected), rel=1e-5) and metrics["grad_norm"] > 1e-3
    assert float(seen["norm"]) == pytest.approx(1e-3, rel=1e-4)  # clipped before the update


@pytest.mark.parametrize("where", ["gradient", "loss"])
def test_non_finite_step_is_skipped(where, caplog):
    cfg = config()
    trainer = Trainer(make_model(cfg), cfg)
    batch = packed_batch(random_docs(torch.Generator().manual_seed(0), [20, 12]))
    trainer.train_step([batch])
    before = [p.detach().clone() for p in trainer.params]
    opt_before = {k: v.clone() for k, v in trainer.optimizer.state[trainer.params[0]].items()}
    target = trainer.model.layers[0].attention.wqkv.weight
    if where == "gradient":
        handle = target.register_hook(lambda g: g * float("nan"))
    else:
        handle = trainer.model.tok_embeddings.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    metrics = trainer.train_step([batch])
    handle.remove()
    assert metrics["skipped"] and metrics["skipped_total"] == 1 and trainer.skipped == 1
    assert "non-finite" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))  # no update, no weight decay
    assert all(torch.equal(v, trainer.optimizer.state[trainer.params[0]][k]) for k, v in opt_before.items())
    assert all(p.grad is None for p in trainer.params)
    after = trainer.train_step([batch])  # training goes on
    assert not after["skipped"] and math.isfinite(after["loss"]) and after["step"] == 3


def test_moe_load_balancing_loss_is_added():
    cfg = config("tiny-mixtral", moe_aux_loss_coef=0.02)
    model = make_model(cfg)
    batch = packed_batch(random_docs(torch.Generator().manual_seed(0), [20, 12]))
    module = CausalLMLoss(model)
    _, aux = module(batch["input_ids"], batch["labels"], batch["cu_seqlens"], batch["max_seqlen"])
    # by hand: HF's loss over the router logits of all layers concatenated
    logits, ids = [], []
    hooks = [layer.feed_forward.gate.register_forward_hook(lambda mod, inp, out: logits.append(out))
             for layer in model.layers]
    model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
    for h in hooks:
        h.remove()
    from mixkit.ops import moe_route
    ids = [moe_route(lg, 2)[1] for lg in logits]
    torch.testing.assert_close(aux, moe_aux_loss(torch.cat(logits), torch.cat(ids), 4, 2))
    gates = {}
    for coef in (0.0, 0.02):
        trainer = Trainer(make_model(cfg), cfg.replace(moe_aux_loss_coef=coef))
        metrics = trainer.train_step([batch])
        gates[coef] = trainer.model.layers[0].feed_forward.gate.weight.detach().clone()
        assert ("aux_loss" in metrics) == (coef > 0)
    assert metrics["aux_loss"] == pytest.approx(float(aux), rel=1e-6)
    assert not torch.equal(gates[0.0], gates[0.02])


def test_activation_checkpointing_and_bf16():
    batch = packed_batch(random_docs(torch.Generator().manual_seed(0), [20, 12]))
    runs = {}
    for prec, ac in (("fp32", False), ("fp32", True), ("bf16", True)):
        cfg = config("tiny-mixtral", precision=prec, activation_checkpointing=ac)
        trainer = Trainer(make_model(cfg), cfg)
        runs[prec, ac] = [trainer.train_step([batch])["loss"] for _ in range(4)]
        assert all(p.dtype == torch.float32 for p in trainer.params)
        assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for k, v in s.items()
                   if k != "step")
    torch.testing.assert_close(runs["fp32", True], runs["fp32", False], rtol=1e-6, atol=0)
    # bf16 compute: 8 mantissa bits, relative rounding 2^-9 per op; the loss stays within 1%
    torch.testing.assert_close(runs["bf16", True], runs["fp32", False], rtol=1e-2, atol=0)


def test_eval_hook_and_metrics():
    cfg = config(eval_every=2, peak_flops=1e12)
    calls = []
    held_out = next(SyntheticLoader(seed=1))

    def evaluate(tr):
        calls.append(tr.step)
        nats, targets = tr.eval_loss(held_out)
        return {"eval_loss": nats / targets}

    trainer = Trainer(make_model(cfg), cfg, data=SyntheticLoader(), eval_fn=evaluate)
    history = trainer.fit(5)
    assert calls == [2, 4] and "eval_loss" in history[1] and "eval_loss" not in history[0]
    assert all(3 < history[i]["eval_loss"] < 6 for i in (1, 3))  # random held-out tokens: about ln(128)
    assert trainer.module.training
    exported = trainer.model_state_dict()
    assert exported.keys() == trainer.model.state_dict().keys()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in exported.items())
    m = history[0]
    assert m["tokens"] == 44 and m["target_tokens"] == 41
    assert m["model_flops"] == batch_flops(cfg.model_args(), [13, 22, 9])
    assert m["mfu"] == pytest.approx(m["model_flops"] / m["step_time_s"] / 1e12)


# ---- schedule, optimizer groups, FLOPs, config --------------------------------------------------------------

def test_lr_schedule():
    for decay in ("cosine", "linear"):
        cfg = config(lr=1.0, warmup_steps=10, max_steps=110, decay=decay)
        assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
        assert lr_at(10, cfg) == pytest.approx(1.0)
        assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: the midpoint for both shapes
        assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
        lrs = [lr_at(s, cfg) for s in range(10, 111)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(35, config(lr=1.0, warmup_steps=10, max_steps=110)) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_groups():
    cfg = config("tiny-olmo")  # tied embeddings, no norm weights
    model = make_model(cfg)
    decay, no_decay = param_groups(model, cfg)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in no_decay["params"]] == [id(model.tok_embeddings.weight)]
    assert all(p.dim() == 2 for p in decay["params"])
    model = make_model(config())
    decay, no_decay = param_groups(model, config())
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["tok_embeddings.weight", "norm.weight"] + [f"layers.{i}.{n}_norm.weight" for i in range(2)
                                                    for n in ("attention", "ffn")])
    decay, _ = param_groups(model, config(decay_embeddings=True, decay_norms_and_biases=True))
    assert len(decay["params"]) == len(list(model.parameters()))


def test_flops_formula():
    assert visible_pairs(10, None) == 55 and visible_pairs(10, 4) == 10 + 6 * 4 and visible_pairs(3, 4) == 6
    args = config().model_args()
    model = Transformer(args)
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n)
    assert active_params(args) == matmul
    moe = config("tiny-mixtral").model_args()
    per_expert = 3 * moe.dim * moe.hidden_dim
    moe_total = sum(p.numel() for n, p in Transformer(moe).named_parameters()
                    if p.dim() >= 2 and "tok_embeddings" not in n)
    assert active_params(moe) == moe_total - moe.n_layers * (moe.moe_num_experts - moe.moe_top_k) * per_expert
    assert batch_flops(args, [10, 5]) == 6 * matmul * 15 + 12 * 2 * 2 * 32 * (55 + 15)


def test_config_toml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model_name = "tiny-mixtral"\nlr = 6e-4\nbetas = [0.9, 0.99]\n[model]\nn_layers = 3\n')
    cfg = load_config(str(path), ["lr=1e-3", "model.dim=64", "precision=fp32", "decay=linear"])
    assert cfg.lr == 1e-3 and cfg.betas == (0.9, 0.99) and cfg.precision == "fp32" and cfg.decay == "linear"
    assert cfg.model_args().n_layers == 3 and cfg.model_args().dim == 64 and cfg.model_args().moe_num_experts == 4
    path.write_text("lr = 1e-3\nwarmup_step = 10\n")
    with pytest.raises(ConfigError, match="'warmup_step'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="'n_layer'"):
        load_config(None, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match="'grad_acum'"):
        config_from_dict({"grad_acum": 2})
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=fp8"])
