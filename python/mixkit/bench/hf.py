"""A Hugging Face Mistral model, eager and SDPA against `mixkit.hf.patch`.

Three cases on the same weights: the forward over `tokens` tokens
(`hf_forward`), forward + backward of a mean-logit loss (`hf_fwd_bwd`), and
one greedy decode step after a `tokens`-long prompt in a DynamicCache
(`hf_decode`; the step's cache entry is cropped away after each call, so
every timed call sees the same length; the sliding-window layers record
their past so that they can be cropped, and still hand attention only the
last W - 1 keys plus the new one). Peers: HF's eager attention
(`attn_implementation="eager"`, the reference), HF's default SDPA, and the
patched model (`mixkit`: attention, RMSNorm and RoPE through mixkit's ops).

GPU: four Mistral 7B layers (hidden 4096, 32/8 heads of 128, FFN 14336,
W = 4096), bf16. CPU: a narrow two-layer model (hidden 256, 4/2 heads of 64,
W = 64), so that the sweep finishes. FLOPs are 2 x parameters x tokens for a
forward and 3x that with the backward (attention excluded), the usual model
accounting; bytes are the parameter bytes, what each call must read at least.
"""

from __future__ import annotations

import copy

import torch

from mixkit.bench.harness import Case

SEQLENS = {
    ("cuda", False): (1024, 3072),
    ("cuda", True): (1024,),
    ("cpu", False): (128, 512),
    ("cpu", True): (64,),
}


def _config(device: str):
    from transformers import MistralConfig

    if torch.device(device).type == "cuda":
        return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=4096,
                             max_position_embeddings=8192)
    return MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=64,
                         max_position_embeddings=2048)


_MODELS: dict = {}


def _models(device: str, dtype: torch.dtype):
    """(eager, sdpa, patched) copies of one random model, built once per
    device and dtype."""
    key = (str(device), dtype)
    if key not in _MODELS:
        import mixkit.hf
        from transformers import MistralForCausalLM

        _MODELS.clear()  # one set of weights alive at a time
        torch.manual_seed(0)
        eager = MistralForCausalLM(_config(device)).to(device=device, dtype=dtype).eval()
        eager.set_attn_implementation("eager")
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        patched = copy.deepcopy(eager)
        mixkit.hf.patch(patched)
        _MODELS[key] = {"eager": eager, "sdpa": sdpa, "mixkit": patched}
    return _MODELS[key]


def _shape(tokens: int, device: str) -> str:
    c = _config(device)
    return f"T={tokens} L={c.num_hidden_layers} H={c.hidden_size} heads={c.num_attention_heads}/{c.num_key_value_heads}"


def _params(model) -> tuple[int, int]:
    n = sum(p.numel() for p in model.parameters())
    return n, sum(p.numel() * p.element_size() for p in model.parameters())


def _ids(tokens: int, device, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)


def hf_forward_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    models = _models(device, dtype)
    ids = _ids(tokens, device, models["eager"].config.vocab_size)

    def forward(m):
        def run():
            with torch.no_grad():
                return m(ids).logits
        return run

    n, nbytes = _params(models["eager"])
    return Case("hf_forward", _shape(tokens, device), dtype, nbytes, {k: forward(m) for k, m in models.items()},
                tokens=tokens, flops=2 * n * tokens)


def hf_fwd_bwd_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    models = _models(device, dtype)
    ids = _ids(tokens, device, models["eager"].config.vocab_size)

    def fwd_bwd(m):
        m.train()

        def run():
            m.zero_grad(set_to_none=True)
            loss = m(ids).logits.float().mean()
            loss.backward()
            return loss.detach()
        return run

    n, nbytes = _params(models["eager"])
    return Case("hf_fwd_bwd", _shape(tokens, device), dtype, nbytes, {k: fwd_bwd(m) for k, m in models.items()},
                tokens=tokens, flops=6 * n * tokens)


def hf_decode_case(device, tokens: int, dtype, compile_mode: str | None) -> Case:
    from transformers import DynamicCache

    models = _models(device, dtype)
    ids = _ids(tokens, device, models["eager"].config.vocab_size)

    def decode(m):
        m.eval()
        cache = DynamicCache(config=m.config)
        for layer in cache.layers:  # sliding-window layers can then be cropped past the window
            getattr(layer, "activate_past_recording", lambda: None)()
        with torch.no_grad():
            nxt = m(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

        def run():
            with torch.no_grad():
                out = m(nxt, cache=cache, use_cache=True).logits
            cache.crop(-1)
            return out
        return run

    n, nbytes = _params(models["eager"])
    return Case("hf_decode", _shape(tokens, device), dtype, nbytes, {k: decode(m) for k, m in models.items()},
                tokens=tokens, flops=2 * n)
