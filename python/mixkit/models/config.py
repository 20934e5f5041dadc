"""ModelArgs for every family mixkit runs (Mistral, Mixtral, Llama 2, OLMo,
OLMo 2, OLMoE, Qwen3-MoE, Ministral, Gemma 2, Gemma 3, gpt-oss), named
configs for the published sizes and tiny ones for tests and demos, and
readers for Hugging Face `config.json` and Mistral's native `params.json`.

The families differ through a few options of the one Transformer:
- per-layer attention: `layer_types` ("sliding_attention" / "full_attention",
  as Hugging Face spells them), the window of the sliding layers, the RoPE
  base of the sliding layers (`rope_local_theta`, Gemma 3) and scaled RoPE
  (`rope_scaling`: linear or YaRN);
- where the norms sit (`norm_placement`): before attention and FFN ("pre"),
  after them on their outputs ("post", OLMo 2), or both ("sandwich", Gemma);
  Gemma's `(1 + w)` RMSNorm (`norm_unit_offset`); RMSNorm on q and k over
  the whole projection ("proj": OLMo 2, OLMoE) or per head ("head": Qwen3,
  Gemma 3);
- embedding scale, attention logit softcap, final logit softcap, the softmax
  scale, attention sinks (gpt-oss);
- the FFN: dense SwiGLU/GeGLU, or top-k experts with or without
  renormalised weights, router and expert biases, gpt-oss's clamped SwiGLU,
  and dense layers among MoE ones (Qwen3-MoE's mlp_only_layers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Mistral's native params.json may omit rope_theta. mistral-inference then
# assumes 1e6 and the HF converter 1e4 (CONVENTIONS.md). The checkpoint that
# omits it, Mistral 7B v0.1, was trained with 1e4; Mixtral's params.json states
# 1e6 explicitly. So mixkit's default is 1e4; pass default_rope_theta to override.
NATIVE_DEFAULT_ROPE_THETA = 1e4

LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("silu", "gelu_tanh")
MOE_ACTIVATIONS = ("silu", "swiglu_oss")
NORM_PLACEMENTS = ("pre", "post", "sandwich")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (MHA)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 14336  # dense FFN width (and the expert width unless moe_hidden_dim)
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
    bias: bool = False  # attention projections and dense FFN
    # Per-layer attention. None: every layer slides when sliding_window is set.
    layer_types: tuple[str, ...] | None = None
    rope_scaling: dict | None = None  # HF rope_parameters of a linear / YaRN RoPE
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: rope_theta
    # Norms.
    norm_placement: str = "pre"
    norm_unit_offset: bool = False  # Gemma: y = norm(x) * (1 + w)
    qk_norm: str | None = None  # None, "proj" (over the q / k projection) or "head" (per head)
    # Scales and caps.
    embed_scale: float | None = None  # Gemma: sqrt(dim), rounded to the weights' dtype as HF does
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(score / cap)
    final_softcap: float | None = None
    attn_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax denominator
    activation: str = "silu"  # the dense FFN's gate: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    # Experts.
    moe_hidden_dim: int | None = None  # None: hidden_dim
    moe_renormalize: bool = True  # softmax over the selected k (True) or the full softmax's top k
    moe_router_bias: bool = False
    moe_expert_bias: bool = False
    moe_activation: str = "silu"  # "silu" or "swiglu_oss" (gpt-oss's clamped SwiGLU)
    moe_swiglu_alpha: float = 1.702
    moe_swiglu_limit: float = 7.0
    moe_dense_layers: tuple[int, ...] = ()  # layers with a dense FFN in an MoE model
    # The family's load-balancing loss weight (HF router_aux_loss_coef: OLMoE
    # 0.01); mixkit.train uses it unless the run sets moe_aux_loss_coef.
    moe_aux_loss_coef: float | None = None
    # The Hugging Face model_type to save as; None: inferred (Mistral, Mixtral, Llama, OLMo).
    family: str | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
        self.moe_dense_layers = tuple(self.moe_dense_layers)

        def choice(name, options, allow_none=False):
            value = getattr(self, name)
            if not (allow_none and value is None) and value not in options:
                raise ValueError(f"ModelArgs: {name} must be one of {options}, got {value!r}")

        choice("norm", ("rms", "layer_np"))
        choice("norm_placement", NORM_PLACEMENTS)
        choice("qk_norm", ("proj", "head"), allow_none=True)
        choice("activation", ACTIVATIONS)
        choice("moe_activation", MOE_ACTIVATIONS)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelArgs: sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.moe_num_experts and not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"ModelArgs: moe_top_k {self.moe_top_k} must be in [1, {self.moe_num_experts}]")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"ModelArgs: layer_types has {len(self.layer_types)} entries for "
                                 f"{self.n_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"ModelArgs: layer_types {bad} are not among {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelArgs: sliding_attention layers need a sliding_window")
        if self.norm == "layer_np" and (self.norm_placement != "pre" or self.qk_norm or self.norm_unit_offset):
            raise ValueError("ModelArgs: OLMo's non-parametric LayerNorm goes with pre-norms only")
        for name in ("attn_softcap", "final_softcap", "embed_scale", "attn_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelArgs: {name} must be > 0 or None, got {value}")
        bad = [i for i in self.moe_dense_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"ModelArgs: moe_dense_layers {bad} are outside [0, {self.n_layers})")
        if self.rope_scaling is not None:
            from ..ops.rope import scaling_kind
            if scaling_kind(self.rope_scaling) == "default":
                self.rope_scaling = None

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---- per layer --------------------------------------------------------------

    def layer_type(self, i: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding_attention" if self.sliding_window is not None else "full_attention"

    def window(self, i: int) -> int | None:
        """Layer i's attention window (None: full causal attention)."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    def rope(self, i: int) -> tuple[float, dict | None]:
        """Layer i's (RoPE base, scaling): Gemma 3's sliding layers have their own
        base and plain RoPE; every other layer the model's."""
        if self.rope_local_theta is not None and self.layer_type(i) == "sliding_attention":
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def is_moe(self, i: int) -> bool:
        return bool(self.moe_num_experts) and i not in self.moe_dense_layers

    @property
    def expert_dim(self) -> int:
        return self.moe_hidden_dim or self.hidden_dim

    @property
    def windows(self) -> list[int | None]:
        return [self.window(i) for i in range(self.n_layers)]


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
_SFS = ("sliding_attention", "full_attention", "sliding_attention")
_GEMMA = dict(norm_placement="sandwich", norm_unit_offset=True, embed_scale=128 ** 0.5, activation="gelu_tanh",
              tie_embeddings=True)
CONFIGS.update({
    "tiny-mistral": ModelArgs(**_TINY, sliding_window=16),
    "tiny-mixtral": ModelArgs(**_TINY, rope_theta=1e6, moe_num_experts=4, moe_top_k=2),
    "tiny-llama": ModelArgs(**_TINY),
    "tiny-olmo": ModelArgs(**{**_TINY, "n_kv_heads": 2}, norm="layer_np", clip_qkv=8.0, tie_embeddings=True),
    # The newer families at the same size, 3 layers so that the per-layer
    # patterns (sliding, full, sliding) and a dense layer among MoE ones show.
    "tiny-olmo2": ModelArgs(**{**_TINY, "n_layers": 3}, norm_eps=1e-6, norm_placement="post", qk_norm="proj",
                            family="olmo2"),
    "tiny-olmoe": ModelArgs(**{**_TINY, "n_layers": 3, "hidden_dim": 64}, qk_norm="proj", moe_num_experts=8,
                            moe_top_k=4, moe_renormalize=False, clip_qkv=8.0, moe_aux_loss_coef=0.01,
                            family="olmoe"),
    "tiny-qwen3-moe": ModelArgs(**{**_TINY, "n_layers": 3}, moe_hidden_dim=64, qk_norm="head", moe_num_experts=8,
                                moe_top_k=4, moe_renormalize=True, moe_dense_layers=(1,), rope_theta=1e6,
                                family="qwen3_moe"),
    "tiny-ministral": ModelArgs(**{**_TINY, "n_layers": 3}, sliding_window=16, layer_types=_SFS, family="ministral"),
    "tiny-gemma2": ModelArgs(**{**_TINY, "n_layers": 3}, sliding_window=16, layer_types=_SFS, **_GEMMA,
                             attn_softcap=50.0, final_softcap=30.0, family="gemma2"),
    "tiny-gemma3": ModelArgs(**{**_TINY, "n_layers": 3}, sliding_window=16, layer_types=_SFS, **_GEMMA,
                             qk_norm="head", rope_theta=1e6, rope_local_theta=1e4, family="gemma3_text"),
    "tiny-gpt-oss": ModelArgs(**{**_TINY, "n_layers": 3, "hidden_dim": 64}, sliding_window=16, layer_types=_SFS,
                              bias=True, attn_sinks=True, rope_theta=150000.0,
                              rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
                              moe_num_experts=8, moe_top_k=4, moe_router_bias=True, moe_expert_bias=True,
                              moe_activation="swiglu_oss", moe_aux_loss_coef=0.01, family="gpt_oss"),
})

_CAUSAL_LM = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM",
              "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmoe": "OlmoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "ministral": "MinistralForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM"}
HF_ARCHITECTURES = tuple(_CAUSAL_LM.values())
_MODEL_TYPES = {arch: model_type for model_type, arch in _CAUSAL_LM.items()}

# Fields that never change the model's math: names, token ids, training-time
# settings (router_aux_loss_coef is a loss weight for trainers to read), and
# the defaults transformers writes from its base config class.
_METADATA = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "output_router_logits",
    "router_aux_loss_coef", "tokenizer_class", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "max_position_embeddings", "tie_word_embeddings", "cache_implementation", "initial_context_length",
    "_sliding_window_pattern", "sliding_window_pattern", "attn_implementation",
    "num_labels", "mixkit_reward_head",  # a reward model's head (mixkit.train.reward), not the LM's
})
# Fields with the one value mixkit implements (others raise, naming the field).
_MUST_BE = {
    "attention_dropout": (0, 0.0, None), "router_jitter_noise": (0, 0.0, None), "pretraining_tp": (1, None),
    "use_bidirectional_attention": (False, None), "partial_rotary_factor": (1, 1.0, None),
    "quantization_config": (None,), "mlp_bias": (False, None),
}
# What each family's reader consumes, beyond the shared core below.
_CORE = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
         "vocab_size", "rope_theta", "rope_parameters", "rope_scaling", "head_dim", "attention_bias"}
_FAMILY_FIELDS = {
    "mistral": {"rms_norm_eps", "sliding_window", "hidden_act"},
    "mixtral": {"rms_norm_eps", "sliding_window", "hidden_act", "num_local_experts", "num_experts_per_tok"},
    "llama": {"rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias"},
    "olmo": {"hidden_act", "attention_bias", "clip_qkv"},
    "olmo2": {"rms_norm_eps", "hidden_act", "attention_bias"},
    "olmoe": {"rms_norm_eps", "hidden_act", "attention_bias", "clip_qkv", "num_experts", "num_local_experts",
              "num_experts_per_tok", "norm_topk_prob"},
    "qwen3_moe": {"rms_norm_eps", "hidden_act", "attention_bias", "num_experts", "num_local_experts",
                  "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size", "decoder_sparse_step",
                  "mlp_only_layers", "use_sliding_window", "sliding_window", "max_window_layers"},
    "ministral": {"rms_norm_eps", "hidden_act", "sliding_window", "layer_types", "attention_bias"},
    "gemma2": {"rms_norm_eps", "hidden_activation", "hidden_act", "attention_bias", "sliding_window", "layer_types",
               "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"},
    "gemma3_text": {"rms_norm_eps", "hidden_activation", "hidden_act", "attention_bias", "sliding_window",
                    "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                    "rope_local_base_freq"},
    "gpt_oss": {"rms_norm_eps", "hidden_act", "attention_bias", "sliding_window", "layer_types", "num_local_experts",
                "num_experts_per_tok", "experts_per_token", "swiglu_alpha", "swiglu_limit"},
}


def _check_fields(cfg: dict, model_type: str) -> None:
    """A field mixkit would silently ignore is an error that names it."""
    known = _METADATA | set(_MUST_BE) | _CORE | _FAMILY_FIELDS[model_type]
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"config.json: {model_type} field(s) {', '.join(map(repr, unknown))} are not supported by "
                         f"mixkit.models (a field it does not implement would change the model's output)")
    for key, allowed in _MUST_BE.items():
        if key in cfg and key not in _FAMILY_FIELDS[model_type] and cfg[key] not in allowed:
            raise ValueError(f"config.json: {key} = {cfg[key]!r} is not supported (mixkit implements "
                             f"{' or '.join(map(repr, [a for a in allowed if a is not None]))})")


def _rope_params(cfg: dict) -> dict:
    """rope_parameters (transformers 5) or the older rope_theta + rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        params = {**cfg["rope_scaling"], **params}
    if cfg.get("rope_theta") is not None:
        params.setdefault("rope_theta", cfg["rope_theta"])
    return params


def _rope(params: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling or None) from one rope_parameters dict."""
    from ..ops.rope import scaling_kind

    theta = float(params.get("rope_theta", default_theta))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:  # the pre-5.0 spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if not scaling or scaling_kind(scaling) == "default":
        return theta, None
    return theta, scaling


def _gelu_or_silu(act: str | None, field: str) -> str:
    if act in (None, "silu", "swish"):
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_tanh"):
        return "gelu_tanh"
    raise ValueError(f"config.json: {field} {act!r} is not supported (silu or gelu_pytorch_tanh)")


def from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json dict (any family in
    HF_ARCHITECTURES). Fields mixkit does not implement raise ValueError
    naming them, instead of being ignored."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    arch = archs[0] if archs else _CAUSAL_LM.get(model_type)
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"config.json: unknown architecture {arch!r} (model_type {model_type!r}); "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    family = _MODEL_TYPES[arch]
    _check_fields(cfg, family)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    moe = family in ("mixtral", "olmoe", "qwen3_moe", "gpt_oss")
    olmo = family == "olmo"
    gemma = family in ("gemma2", "gemma3_text")
    bias = bool(cfg.get("attention_bias", False))
    if family == "llama" and bias != bool(cfg.get("mlp_bias", bias)):
        raise ValueError("config.json: attention_bias and mlp_bias must agree")
    if family not in ("gemma2", "gemma3_text", "gpt_oss"):
        activation = _gelu_or_silu(cfg.get("hidden_act", "silu"), "hidden_act")
        if activation != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    kw = dict(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
              n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
              hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
              norm="layer_np" if olmo else "rms", norm_eps=1e-5 if olmo else cfg.get("rms_norm_eps", 1e-6),
              max_seq_len=cfg.get("max_position_embeddings", 4096), clip_qkv=cfg.get("clip_qkv"),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)), bias=bias,
              family=None if family in ("mistral", "mixtral", "llama", "olmo") else family)

    params = _rope_params(cfg)
    if family == "gemma3_text":  # rope_parameters per layer type: global (full) and local (sliding)
        full, local = params.get("full_attention"), params.get("sliding_attention")
        if full is None and local is None:  # the older flat form
            full, local = params, {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
        kw["rope_theta"], kw["rope_scaling"] = _rope(full or {}, 1e6)
        kw["rope_local_theta"], local_scaling = _rope(local or {}, 1e4)
        if local_scaling is not None:
            raise ValueError("config.json: scaled RoPE on Gemma 3's sliding layers is not supported")
    else:
        kw["rope_theta"], kw["rope_scaling"] = _rope(params, 1e4)

    window = cfg.get("sliding_window")
    if family == "qwen3_moe" and not cfg.get("use_sliding_window", False):
        window = None
    if family == "qwen3_moe" and window is not None and cfg.get("max_window_layers") not in (None,
                                                                                              cfg["num_hidden_layers"]):
        raise ValueError("config.json: max_window_layers is not supported (transformers' Qwen3-MoE ignores it too)")
    if family in ("mistral", "mixtral", "qwen3_moe", "ministral", "gemma2", "gemma3_text", "gpt_oss"):
        kw["sliding_window"] = window
    if family in ("ministral", "gemma2", "gemma3_text", "gpt_oss"):
        types = cfg.get("layer_types")
        if types is None and family == "gemma2":  # transformers' default: even layers slide
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(kw["n_layers"])]
        elif types is None and family == "gemma3_text":
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(kw["n_layers"])]
        elif types is None and family == "gpt_oss":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["n_layers"])]
        elif types is None:
            types = ["sliding_attention" if window is not None else "full_attention"] * kw["n_layers"]
        kw["layer_types"] = tuple(types)

    if family == "olmo2":
        kw.update(norm_placement="post", qk_norm="proj")
    if family == "olmoe":
        if kw["head_dim"] * heads != cfg["hidden_size"]:
            raise ValueError("config.json: OLMoE needs hidden_size = num_attention_heads * head_dim")
        kw.update(qk_norm="proj")
    if family == "qwen3_moe":
        kw.update(qk_norm="head")
    if gemma:
        kw.update(norm_placement="sandwich", norm_unit_offset=True, embed_scale=float(cfg["hidden_size"]) ** 0.5,
                  attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                  activation=_gelu_or_silu(cfg.get("hidden_activation", "gelu_pytorch_tanh"), "hidden_activation"),
                  final_softcap=cfg.get("final_logit_softcapping"))
        if family == "gemma2":
            kw["attn_softcap"] = cfg.get("attn_logit_softcapping")
        else:
            kw["qk_norm"] = "head"
            if cfg.get("attn_logit_softcapping") is not None:
                raise ValueError("config.json: attn_logit_softcapping is not used by transformers' Gemma 3 "
                                 "attention; mixkit refuses it rather than guess")
    if family == "gpt_oss":
        kw.update(attn_sinks=True)

    if moe:
        experts = cfg.get("num_local_experts", cfg.get("num_experts", 8))
        top_k = cfg.get("num_experts_per_tok", cfg.get("experts_per_token", 2))
        kw.update(moe_num_experts=experts, moe_top_k=top_k)
        if family in ("olmoe", "qwen3_moe"):
            kw["moe_renormalize"] = bool(cfg.get("norm_topk_prob", False))
        if family == "qwen3_moe":
            kw["moe_hidden_dim"] = cfg["moe_intermediate_size"]
            step = cfg.get("decoder_sparse_step", 1)
            only = set(cfg.get("mlp_only_layers") or [])
            kw["moe_dense_layers"] = tuple(i for i in range(kw["n_layers"])
                                           if i in only or experts == 0 or (i + 1) % step)
        if cfg.get("router_aux_loss_coef") is not None and family != "mixtral":
            kw["moe_aux_loss_coef"] = float(cfg["router_aux_loss_coef"])
        if family == "gpt_oss":
            kw.update(moe_router_bias=True, moe_expert_bias=True, moe_activation="swiglu_oss",
                      moe_swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                      moe_swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
    return ModelArgs(**kw)


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
