"""ModelArgs for Mistral, Mixtral, Llama 2 and OLMo-1, named configs for the
published sizes and tiny ones for tests and demos, and readers for Hugging
Face `config.json` and Mistral's native `params.json`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Mistral's native params.json may omit rope_theta. mistral-inference then
# assumes 1e6 and the HF converter 1e4 (CONVENTIONS.md). The checkpoint that
# omits it, Mistral 7B v0.1, was trained with 1e4; Mixtral's params.json states
# 1e6 explicitly. So mixkit's default is 1e4; pass default_rope_theta to override.
NATIVE_DEFAULT_ROPE_THETA = 1e4


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (MHA)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 14336  # FFN width (per expert for MoE)
    vocab_size: int = 32000
    norm: str = "rms"  # "rms" (weighted RMSNorm) or "layer_np" (OLMo's non-parametric LayerNorm)
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    rope_interleaved: bool = False  # False: half-split (HF weights); True: Meta/Mistral native layout
    sliding_window: int | None = None
    max_seq_len: int = 4096
    moe_num_experts: int = 0  # 0: dense FFN
    moe_top_k: int = 2
    clip_qkv: float | None = None
    tie_embeddings: bool = False
    bias: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.norm not in ("rms", "layer_np"):
            raise ValueError(f"ModelArgs: norm must be 'rms' or 'layer_np', got {self.norm!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelArgs: sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.moe_num_experts and not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"ModelArgs: moe_top_k {self.moe_top_k} must be in [1, {self.moe_num_experts}]")

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


# Published sizes, from the papers and the HF config.json of each checkpoint.
CONFIGS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                                 norm_eps=1e-5, rope_theta=1e4, sliding_window=4096, max_seq_len=32768),
    "mixtral-8x7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                              norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768, moe_num_experts=8, moe_top_k=2),
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000, norm_eps=1e-5,
                            max_seq_len=4096),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000, norm_eps=1e-5,
                             max_seq_len=4096),
    "llama-2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=32000,
                             norm_eps=1e-5, max_seq_len=4096),
    "olmo-1b": ModelArgs(dim=2048, n_layers=16, n_heads=16, hidden_dim=8192, vocab_size=50304, norm="layer_np",
                         norm_eps=1e-5, max_seq_len=2048, tie_embeddings=True),
    "olmo-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=50304, norm="layer_np",
                         norm_eps=1e-5, max_seq_len=2048),
}

# Tiny configs: head_dim 64 so decode_attn runs on the GPU too (it takes 64 and
# 128 there); byte-level vocabulary of 256 for the demo tokenizer; window 16 so
# a short demo already wraps the rolling cache.
_TINY = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, hidden_dim=256, vocab_size=256,
             max_seq_len=512)
CONFIGS.update({
    "tiny-mistral": ModelArgs(**_TINY, sliding_window=16),
    "tiny-mixtral": ModelArgs(**_TINY, rope_theta=1e6, moe_num_experts=4, moe_top_k=2),
    "tiny-llama": ModelArgs(**_TINY),
    "tiny-olmo": ModelArgs(**{**_TINY, "n_kv_heads": 2}, norm="layer_np", clip_qkv=8.0, tie_embeddings=True),
})

HF_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM", "OlmoForCausalLM")

_MODEL_TYPES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM",
                "olmo": "OlmoForCausalLM"}  # for config.json files without "architectures"


def _hf_rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"config.json: rope scaling {kind!r} is not supported (only plain RoPE)")
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    if params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 1e4  # the transformers default for all four families


def from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json dict (Mistral, Mixtral, Llama, OLMo)."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    arch = archs[0] if archs else _MODEL_TYPES.get(model_type)
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"config.json: unknown architecture {arch!r} (model_type {model_type!r}); "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    olmo = arch == "OlmoForCausalLM"
    moe = arch == "MixtralForCausalLM"
    bias = bool(cfg.get("attention_bias", False))
    if bias != bool(cfg.get("mlp_bias", bias)):
        raise ValueError("config.json: attention_bias and mlp_bias must agree")
    window = cfg.get("sliding_window") if arch == "MistralForCausalLM" or moe else None
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=cfg.get("head_dim"),
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        norm="layer_np" if olmo else "rms", norm_eps=1e-5 if olmo else cfg.get("rms_norm_eps", 1e-6),
        rope_theta=_hf_rope_theta(cfg), sliding_window=window,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        moe_num_experts=cfg.get("num_local_experts", 8) if moe else 0, moe_top_k=cfg.get("num_experts_per_tok", 2),
        clip_qkv=cfg.get("clip_qkv"), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bias=bias)


def from_mistral_params(params: dict, default_rope_theta: float = NATIVE_DEFAULT_ROPE_THETA,
                        max_seq_len: int = 32768) -> ModelArgs:
    """ModelArgs from Mistral's native params.json. The weights are loaded with
    the q/k permutation to the half-split layout, so rope_interleaved is False.
    Without `rope_theta` in params, `default_rope_theta` (1e4, see above) is used."""
    moe = params.get("moe") or {}
    theta = params.get("rope_theta")
    return ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), head_dim=params.get("head_dim"), hidden_dim=params["hidden_dim"],
        vocab_size=params["vocab_size"], norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(theta if theta is not None else default_rope_theta),
        sliding_window=params.get("sliding_window"), max_seq_len=params.get("max_seq_len", max_seq_len),
        moe_num_experts=moe.get("num_experts", 0), moe_top_k=moe.get("num_experts_per_tok", 2))
