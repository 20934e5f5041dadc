"""Training losses: chunked next-token cross-entropy, SFT masking, the Llama 2
reward model and ranking loss, DPO and rejection sampling.

Label convention (the mixkit.data batches): `labels[t]` is the target of the
prediction made at position t, i.e. already shifted (`labels[t] = tokens[t+1]`
inside a document), and IGNORE_INDEX (-100) marks positions without a loss:
the last token of each document, SFT prompt tokens, padding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..models.generate import generate
from ..models.model import Transformer

IGNORE_INDEX = -100


# ---- chunked cross-entropy --------------------------------------------------------------------------------------

class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against labels, chunk by chunk.

    The gradients are computed in the forward, chunk by chunk (Liger's fused
    linear cross-entropy): only one (chunk, vocab) float32 logits block is
    alive at a time, in the forward and, since the backward only scales the
    stored gradients, in the backward too. The price: a float32 (vocab, dim)
    gradient buffer for the weight and a (tokens, dim) one for the hidden
    states, both held from the forward to the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, softcap=None):
        needs_grad = hidden.requires_grad or weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        for lo in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[lo:lo + chunk_size], labels[lo:lo + chunk_size]
            logits = torch.matmul(h, weight.t()).float()
            if softcap is not None:  # Gemma 2: logits = c tanh(z / c), d logits / dz = 1 - tanh^2
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None])[:, 0]
            total += torch.where(valid, lse - picked, 0.0).sum()
            if needs_grad:
                # d(lse - logit_y)/d logits = softmax - onehot(y), zero on ignored rows
                grad = torch.exp(logits.sub_(lse[:, None]))
                grad.scatter_add_(1, target[:, None], torch.full_like(lse[:, None], -1.0))
                grad.mul_(valid[:, None])
                if softcap is not None:
                    grad.mul_(1 - capped * capped)
                grad = grad.to(weight.dtype)
                if grad_hidden is not None:
                    grad_hidden[lo:lo + chunk_size] = torch.matmul(grad, weight)
                if grad_weight is not None:
                    grad_weight += torch.matmul(grad.t(), h).float()
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096, reduction: str = "sum",
                          softcap: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the logits `hidden @ weight.T`, never
    materialising the (tokens, vocab) logits: float32 logits are formed
    `chunk_size` tokens at a time, in the forward and the backward. softcap:
    the model's final logit softcap (Gemma 2), `c tanh(logits / c)`.

    hidden: (..., dim) final hidden states; weight: (vocab, dim), the output
    projection; labels: (...) int64, IGNORE_INDEX to skip. reduction "sum"
    (float32 scalar; divide by the target count yourself, e.g. across
    micro-batches) or "mean" over the non-ignored labels.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"chunked_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"chunked_cross_entropy: {labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    total = _ChunkedCrossEntropy.apply(hidden, weight, labels, int(chunk_size), softcap)
    if reduction == "mean":
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total


def _chunk_logprobs(h, weight, target, softcap=None):
    logits = torch.matmul(h, weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 4096, softcap: float | None = None) -> torch.Tensor:
    """float32 `log p(labels[t] | ...)` per position (0 where IGNORE_INDEX), shape
    of labels. Chunked like chunked_cross_entropy, but each chunk is a
    torch.utils.checkpoint region, so the backward recomputes one chunk's
    logits at a time: this serves losses that weight tokens unequally (DPO)."""
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    parts = []
    for lo in range(0, hidden.shape[0], chunk_size):
        args = (hidden[lo:lo + chunk_size], weight, target[lo:lo + chunk_size], softcap)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.where(valid, torch.cat(parts), 0.0).view(shape)


# ---- SFT ----------------------------------------------------------------------------------------------------------

def sft_example(prompt: Sequence[int], answer: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both int64 (len(prompt) + len(answer),), for Llama 2
    SFT: the loss covers the answer tokens only. Position t predicts token
    t + 1, so labels are the answer tokens at positions len(prompt) - 1 ..
    end - 2 and IGNORE_INDEX elsewhere (prompt targets and the last token)."""
    if not prompt or not answer:
        raise ValueError("sft_example: prompt and answer must both be non-empty")
    ids = torch.tensor(list(prompt) + list(answer), dtype=torch.int64)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[len(prompt) - 1:-1] = ids[len(prompt):]
    return ids, labels


# ---- reward model ------------------------------------------------------------------------------------------------

# Llama 2 (Touvron et al. 2023), Appendix A.3.3, Table 27, the "Margin Small"
# variant: the margin m(r) of the ranking loss per preference rating. (Margin
# Large is 3, 2, 1, 0.)
LLAMA2_MARGINS = {"significantly_better": 1.0, "better": 2.0 / 3.0, "slightly_better": 1.0 / 3.0,
                  "negligibly_better": 0.0, "unsure": 0.0}


class RewardModel(nn.Module):
    """Llama 2's reward model: the transformer with its next-token head replaced
    by a scalar head; the score of a sequence is the head applied to the final
    hidden state of its last (non-pad) token."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.score_head = nn.Linear(model.args.dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """float32 scores. Either tokens (B, S) right-padded with `lengths` (B,)
        real tokens each (default S): scores (B,); or packed tokens (1, T) with
        cu_seqlens: one score per document (N,)."""
        hidden = self.model(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_hidden=True)
        if cu_seqlens is not None:
            last = hidden[0, cu_seqlens[1:].long() - 1]
        else:
            b, s = tokens.shape
            if lengths is None:
                lengths = torch.full((b,), s, device=tokens.device)
            # causal attention: right padding never reaches the last real token
            last = hidden[torch.arange(b, device=tokens.device), lengths.long() - 1]
        return self.score_head(last).float().squeeze(-1)


def reward_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                        margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Llama 2's binary ranking loss, mean over pairs:
    `-log sigmoid(r_chosen - r_rejected - m(r))`; margin per pair (see
    LLAMA2_MARGINS and `margins`)."""
    return F.softplus(-(chosen.float() - rejected.float() - margin)).mean()


def margins(ratings: Sequence[str], table: dict[str, float] = LLAMA2_MARGINS, device=None) -> torch.Tensor:
    """float32 margins for preference ratings such as "better"."""
    unknown = sorted(set(ratings) - set(table))
    if unknown:
        raise ValueError(f"margins: unknown rating(s) {unknown}; known: {sorted(table)}")
    return torch.tensor([table[r] for r in ratings], dtype=torch.float32, device=device)


# ---- DPO ------------------------------------------------------------------------------------------------------------

def sequence_logprobs(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, *,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                      chunk_size: int = 4096) -> torch.Tensor:
    """float32 `log pi(y | x)` summed over the answer tokens (labels !=
    IGNORE_INDEX, shifted as in sft_example): (B,) for tokens (B, S), or one
    per document (N,) for packed tokens (1, T) with cu_seqlens."""
    hidden = model(tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_hidden=True)
    logp = token_logprobs(hidden, model.output.weight, labels, chunk_size, softcap=model.args.final_softcap)
    if cu_seqlens is None:
        return logp.sum(-1)
    t = tokens.shape[1]
    doc = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(t, device=tokens.device), right=True)
    return torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.float32, device=tokens.device).index_add_(
        0, doc, logp[0])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), mean over pairs:
    `-log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))`,
    from summed sequence log-probs (sequence_logprobs). The reference terms
    carry no gradient (computed under no_grad from the frozen model)."""
    logits = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return F.softplus(-beta * logits.float()).mean()


# ---- rejection sampling --------------------------------------------------------------------------------------

@torch.no_grad()
def rejection_sample(policy: Transformer, reward_model: RewardModel, prompt: Sequence[int], k: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     stop: Sequence[int] = ()) -> tuple[list[int], float, list[tuple[list[int], float]]]:
    """Llama 2's rejection sampling: k completions of `prompt` from the policy
    (mixkit.generate at temperature > 0, seeds seed .. seed + k - 1), each
    scored by the reward model on prompt + completion; returns (best
    completion, its score, all (completion, score) pairs). Ties go to the
    first sample."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"rejection_sample: needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    samples = [generate(policy, list(prompt), max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                        stop=stop)[0] for i in range(k)]
    device = reward_model.score_head.weight.device
    seqs = [list(prompt) + s for s in samples]
    length = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (length - len(s)) for s in seqs], device=device)
    scores = reward_model(tokens, torch.tensor([len(s) for s in seqs], device=device)).tolist()
    best = max(range(k), key=lambda i: (scores[i], -i))
    return samples[best], scores[best], list(zip(samples, scores))
