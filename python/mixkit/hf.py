"""mixkit inside Hugging Face `transformers`: attention, norms, RoPE and experts.

    import mixkit.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mixkit",
                                                 experts_implementation="mixkit")
    report = mixkit.hf.patch(model)     # an already-loaded model: norms and RoPE too
    mixkit.hf.unpatch(model)            # back to HF's exact eager behaviour

Importing this module registers, once, an attention function and its mask
function under the name "mixkit" (`AttentionInterface`,
`AttentionMaskInterface`) and an experts function (`ExpertsInterface`).

How HF's attention call maps onto the ops. HF hands the attention function q
(B, H, Sq, D) and the keys/values its cache returns (B, Hkv, Sk, D); they are
passed as `.transpose(1, 2)` views, with GQA left unexpanded. The mask
function turns HF's mask arguments into a `MixkitMask`: `end`, the number of
keys that exist (for a StaticCache, whose buffer holds unwritten slots, a
device tensor), and `starts`, each row's first key that is not padding (a
device tensor, or None when nothing is padded). Key j of a row is readable
when starts[b] <= j < end; the queries are the `Sq` positions ending at
`end`, so masks are bottom-right aligned within that range. Then:
- decode (Sq = 1): `decode_attn` with cache_seqlens = end and
  cache_starts = starts, no host sync (static caches included);
- prefill, nothing padded, every key written: `flash_attn` on the views;
- otherwise (padding, a static buffer, packed rows): `flash_attn_varlen`
  with three segments per row (padding, the real keys, unwritten slots), or
  one per packed document from `cu_seq_lens_q/k` or `position_ids`.
HF's sliding window W counts the query itself, as mixkit's does, so W passes
through unchanged (tests/test_hf.py shows W - 1 and W + 1 both fail).

Attention sinks (gpt-oss's `sinks`, which HF passes as `s_aux`), logit
softcapping (Gemma 2's `attn_logit_softcapping`, passed as `softcap`) and
each layer's own sliding window (HF passes `sliding_window=None` for full
layers) go to the ops as they are; the sinks as float32, through a
differentiable cast of the parameter.

Where mixkit has no kernel the call goes to HF's own sdpa (eager when
attention weights are requested, or when the layer has sinks or a softcap,
which sdpa lacks) and `counters` records why: user-supplied 4D masks, custom
mask functions (or_mask/and_mask), padding masks with holes,
output_attentions, attention dropout in training, non-causal attention, and
dtypes or head dims the GPU kernels lack.
`patch(model, strict=True)` makes those raise instead. Holes in a padding
mask are detected in prefill only (one host sync per forward, as HF's
FlashAttention path has); a decode step trusts the mask, so generating after
a right-padded prompt (which HF warns against) would read the padding.
"""
from __future__ import annotations

import collections
import importlib
import sys
import weakref

import torch

from . import ops
from .ops import decode as _decode_op

_flash_op = importlib.import_module("mixkit.ops.flash_attn")  # the module (ops.flash_attn is the function)

MIN_TRANSFORMERS = "5.0.0"  # pyproject.toml's `hf` extra pins the same

try:
    import transformers
    from packaging.version import Version
except ImportError as exc:
    raise ImportError(f"mixkit.hf needs transformers >= {MIN_TRANSFORMERS} ({exc}): pip install 'mixkit[hf]'"
                      ) from exc


def check_transformers_version(version: str) -> None:
    """ImportError naming the minimum for a transformers older than 5.0 (the
    attention/mask interfaces and cache layers this module relies on)."""
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"mixkit.hf needs transformers >= {MIN_TRANSFORMERS}, found {version}: pip install "
                          "'mixkit[hf]'")


check_transformers_version(transformers.__version__)

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask  # noqa: E402

try:  # the experts interface arrived during 5.x
    from transformers.integrations.moe import ExpertsInterface
except ImportError:  # pragma: no cover - depends on the installed version
    ExpertsInterface = None

NAME = "mixkit"
# transformers.models.<family>: every model class of these families (base
# model, causal LM, sequence/token classification, QA heads) can be patched.
SUPPORTED = ("mistral", "mixtral", "llama", "olmo", "olmo2", "olmoe", "qwen3_moe", "ministral", "gemma2", "gemma3",
             "gpt_oss")
# Gemma 3's multimodal classes carry a vision tower mixkit does not patch.
_UNSUPPORTED_CLASSES = ("Gemma3ForConditionalGeneration", "Gemma3Model", "Gemma3ForSequenceClassification")
GPU_DTYPES = (torch.float16, torch.bfloat16)

# What ran: "flash_attn", "flash_attn_varlen", "decode_attn", "rms_norm",
# "layer_norm", "rope", "moe_experts", and "fallback: <reason>" per call
# that went to HF's path. Not updated inside torch.compile'd code (a Python
# side effect there would cost a graph break).
counters: collections.Counter = collections.Counter()


def reset_counters() -> None:
    counters.clear()


def _count(key: str) -> None:
    if not torch.compiler.is_compiling():
        counters[key] += 1


class MixkitFallback(RuntimeError):
    """Raised instead of falling back to HF's attention when strict=True."""


# ---- the mask function -------------------------------------------------------------

class MixkitMask:
    """What the attention function needs, computed once per forward by the mask
    function: see the module docstring. `hf_args` rebuilds HF's own boolean
    mask, only when a call falls back.

    generate() builds the mask ahead of the forward for compileable caches and
    hands it back as `attention_mask`; HF then checks its `ndim` (2 would
    mean a padding mask to process) and passes it to the mask function again,
    which returns it unchanged."""

    ndim = 4

    def __init__(self, starts, end, kv_length, q_length, no_past, hf_args, fallback=None):
        # no_past: no cache entries before these queries and no 2D mask given,
        # the only case in which HF reads packed rows from position_ids.
        self.starts = starts
        self.end = end
        self.kv_length = kv_length
        self.q_length = q_length
        self.no_past = no_past
        self.hf_args = hf_args
        self.fallback = fallback

    def hf_mask(self):
        return sdpa_mask(**self.hf_args, allow_is_causal_skip=False)


def _single_run(valid: torch.Tensor) -> torch.Tensor:
    """Per row: are the True entries one contiguous run? (False ... True ...
    False: left or right padding; anything else has holes.)"""
    v = valid.int()
    rises = (v[:, 1:] > v[:, :-1]).sum(-1) + v[:, 0]
    return rises <= 1


def mixkit_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                use_vmap=False, device="cpu", **kwargs):
    """`AttentionMaskInterface` entry: a MixkitMask instead of a 4D tensor."""
    if isinstance(attention_mask, MixkitMask):
        return attention_mask
    compiling = torch.compiler.is_compiling()
    hf_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                   kv_offset=kv_offset, attention_mask=attention_mask, use_vmap=use_vmap, device=device)
    if mask_function is not None:
        hf_args["mask_function"] = mask_function
    # Keys that exist: the causal horizon of the last query. An int except for
    # HF's StaticCache, whose offset is a device tensor (no host sync here).
    end = q_offset + q_length - kv_offset
    no_past = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and attention_mask is None
    fallback = "custom mask function (or_mask/and_mask)" if use_vmap else None
    starts = None
    if attention_mask is not None and fallback is None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        key_index = torch.arange(kv_length, device=padding.device)
        valid = padding & (key_index < end)
        has_key = valid.any(-1)
        starts = torch.where(has_key, valid.int().argmax(-1), torch.full_like(has_key, kv_length, dtype=torch.long))
        starts = starts.to(torch.int32)
        if not compiling and q_length > 1:
            # Prefill only (decode would pay a sync per step): a mask with holes
            # has no first-key form; a mask without padding needs none.
            if not bool(_single_run(valid).all()):
                fallback = "padding mask with holes (not left/right padding)"
            elif bool((starts == 0).all()):
                starts = None
    return MixkitMask(starts, end, kv_length, q_length, no_past, hf_args, fallback)


# ---- the attention function --------------------------------------------------------

def _window(sliding_window):
    """The W the kernels get: HF's W counts the query itself, as mixkit's does.
    A function so tests can substitute W - 1 / W + 1 (the negative control)."""
    return sliding_window


def _output_attentions_requested() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _fallback_reason(module, query, attention_mask, dropout, kwargs):
    if _output_attentions_requested() or kwargs.get("output_attentions"):
        return "output_attentions"
    if attention_mask is not None and not isinstance(attention_mask, MixkitMask):
        return "user-supplied 4D mask"
    if isinstance(attention_mask, MixkitMask) and attention_mask.fallback:
        return attention_mask.fallback
    if dropout and module.training:
        return "attention dropout in training"
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return "non-causal attention"
    if query.device.type == "cuda":
        decode = query.shape[2] == 1
        if query.dtype not in GPU_DTYPES and not decode:
            return f"{query.dtype} on the GPU (flash_attn: bfloat16/float16)"
        op = _decode_op if decode else _flash_op
        if query.shape[-1] not in op.GPU_HEAD_DIMS:
            return f"head_dim {query.shape[-1]} on the GPU (kernels: {', '.join(map(str, op.GPU_HEAD_DIMS))})"
    return None


def _hf_attention(reason, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs):
    if getattr(module, "mixkit_strict", False):
        raise MixkitFallback(f"mixkit.hf: no mixkit kernel for this call ({reason}); strict=True")
    _count(f"fallback: {reason}")
    mask = attention_mask.hf_mask() if isinstance(attention_mask, MixkitMask) else attention_mask
    # sdpa has neither sinks nor a softcap: those layers take the model's own
    # eager function, which reads them (gpt-oss its module.sinks).
    if reason == "output_attentions" or softcap is not None or "s_aux" in kwargs:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        if softcap is not None:
            kwargs = {**kwargs, "softcap": softcap}
        return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "sliding_window"}
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _packed_cu_seqlens(position_ids, batch, seqlen):
    """cu_seqlens over the B * S flattened tokens from position_ids: a document
    starts where a position is not its predecessor + 1 (HF's rule), and at
    every row. Eager: the real boundaries (one host sync, cached on the
    tensor). Under torch.compile: S * B entries, cu[t] = the start of t's
    document, so every document is one segment and the rest are empty; no
    data-dependent shape."""
    pos = position_ids.expand(batch, seqlen).reshape(-1)
    total = pos.shape[0]
    idx = torch.arange(total, device=pos.device)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[1:] = pos[1:] != pos[:-1] + 1
    start = start | (idx % seqlen == 0)
    tail = torch.full((1,), total, dtype=torch.int32, device=pos.device)
    if torch.compiler.is_compiling():
        cu = torch.where(start, idx, torch.zeros_like(idx)).cummax(0).values.to(torch.int32)
        return torch.cat([cu, tail]), seqlen, None
    stamp = (position_ids._version, batch, seqlen)
    cached = getattr(position_ids, "_mixkit_packed", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    cu = torch.cat([start.nonzero()[:, 0].to(torch.int32), tail])
    n_docs = cu.shape[0] - 1
    result = (cu, int((cu[1:] - cu[:-1]).max()), n_docs)
    position_ids._mixkit_packed = (stamp, result)
    return result


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, window, scaling, extra):
    out = ops.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window=window,
                                softmax_scale=scaling, **extra)
    _count("flash_attn_varlen")
    return out


def mixkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """`AttentionInterface` entry: returns (output (B, Sq, H, D), None)."""
    s_aux = kwargs.get("s_aux")
    reason = _fallback_reason(module, query, attention_mask, dropout, kwargs)
    if reason is not None:
        return _hf_attention(reason, module, query, key, value, attention_mask, dropout, scaling, softcap, kwargs)
    # Sinks and softcap, for every op below; the sinks cast keeps the
    # parameter's gradient.
    extra = dict(sinks=s_aux.float() if s_aux is not None else None, softcap=softcap)
    b, h, sq, d = query.shape
    sk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = _window(sliding_window)
    mask = attention_mask
    end = mask.end if mask is not None else sk
    starts = mask.starts if mask is not None else None
    static = not isinstance(end, int) or end != sk

    if sq == 1:
        seqlens = (end.reshape(1).to(torch.int32).expand(b).contiguous() if isinstance(end, torch.Tensor)
                   else torch.full((b,), end, dtype=torch.int32, device=q.device))
        out = ops.decode_attn(q[:, 0], k, v, seqlens, window=window, softmax_scale=scaling, cache_starts=starts,
                              **extra)
        _count("decode_attn")
        return out[:, None], None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and b == 1:
        # Packed rows given as FlashAttention kwargs (DataCollatorWithFlattening).
        out = _varlen(q[0], k[0], v[0], cu_q.to(torch.int32), cu_k.to(torch.int32),
                      int(kwargs.get("max_length_q") or sq), int(kwargs.get("max_length_k") or sk), window, scaling,
                      extra)
        return out[None], None

    position_ids = kwargs.get("position_ids")
    if starts is None and not static and mask is not None and mask.no_past and sq == sk and position_ids is not None:
        cu, max_len, n_docs = _packed_cu_seqlens(position_ids, b, sq)
        if n_docs is None or n_docs > b:
            out = _varlen(q.reshape(b * sq, h, d), k.reshape(b * sk, -1, d), v.reshape(b * sk, -1, d), cu, cu,
                          max_len, max_len, window, scaling, extra)
            return out.view(b, sq, h, d), None

    if starts is None and not static:
        out = ops.flash_attn(q, k, v, causal=True, window=window, softmax_scale=scaling, **extra)
        _count("flash_attn")
        return out, None

    # Padding and/or unwritten static slots: per row three segments, keys
    # [0, s) padding, [s, end) real, [end, Sk) unwritten, and the queries
    # split into those before s (padding queries; their output is unused) and
    # the rest. Everything stays on the device.
    end_t = end if isinstance(end, torch.Tensor) else torch.tensor(end, device=q.device)
    end_t = end_t.to(device=q.device, dtype=torch.int32).reshape(1).expand(b)
    s = starts if starts is not None else torch.zeros(b, dtype=torch.int32, device=q.device)
    s = torch.minimum(s, end_t)
    q_pad = (s - (end_t - sq)).clamp(0, sq)
    zeros = torch.zeros_like(s)
    q_lens = torch.stack([q_pad, sq - q_pad, zeros], 1).reshape(-1)
    k_lens = torch.stack([s, end_t - s, sk - end_t], 1).reshape(-1)
    first = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q = torch.cat([first, q_lens.cumsum(0).to(torch.int32)])
    cu_k = torch.cat([first, k_lens.cumsum(0).to(torch.int32)])
    out = _varlen(q.reshape(b * sq, h, d), k.reshape(b * sk, -1, d), v.reshape(b * sk, -1, d), cu_q, cu_k,
                  sq, sk, window, scaling, extra)
    return out.view(b, sq, h, d), None


# ---- experts -----------------------------------------------------------------------

def _expert_gate(module):
    """How the experts gate: ("swiglu_oss", None) for gpt-oss's clamped
    SwiGLU, ("act", act_fn) for transformers' default act_fn(gate) * up, or
    (None, reason) for a gate mixkit does not know."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - transformers versions before custom gates
        _default_apply_gate = None
    gate = getattr(type(module), "_apply_gate", None)
    if gate is None or gate is _default_apply_gate:
        return "act", getattr(module, "act_fn", None)
    if type(module).__name__ == "GptOssExperts" and hasattr(module, "alpha") and hasattr(module, "limit"):
        return "swiglu_oss", None
    return None, f"custom gate function {type(module).__name__}._apply_gate"


def _experts_fallback(module):
    if not getattr(module, "has_gate", True):
        return "experts without a gate"
    if getattr(module, "has_post_expert_norm", False):
        return "post-expert norm"
    kind, why = _expert_gate(module)
    return why if kind is None else None


def mixkit_experts(module, hidden_states, top_k_index, top_k_weights):
    """`ExpertsInterface` entry: HF's router stays (router logits and the aux
    loss are untouched); the experts run as ops.moe_experts on HF's own
    tensors, no copies: gate_up_proj (E, 2F, H) and down_proj (E, H, F)
    (Mixtral, OLMoE, Qwen3-MoE), or gpt-oss's transposed, interleaved
    (E, H, 2F) / (E, F, H) with their biases and its clamped SwiGLU. Any other
    gate activation runs between the grouped GEMMs. What mixkit cannot serve
    goes to transformers' grouped_mm experts (what it would pick itself),
    never to the per-expert loop."""
    reason = _experts_fallback(module)
    if reason is None and hidden_states.dtype != module.gate_up_proj.dtype:
        reason = "hidden states and expert weights differ in dtype"
    if reason is not None:
        try:
            from transformers.integrations.moe import grouped_mm_experts_forward as hf_experts
        except ImportError:  # pragma: no cover - a transformers version without grouped_mm experts
            hf_experts = type(module).forward.__wrapped__
        _count(f"fallback: {reason}")
        return hf_experts(module, hidden_states, top_k_index, top_k_weights)
    kind, act = _expert_gate(module)
    kw = dict(transposed=bool(getattr(module, "is_transposed", False)),
              interleaved=not getattr(module, "is_concatenated", True))
    if getattr(module, "has_bias", False):
        kw.update(w13_bias=module.gate_up_proj_bias, w2_bias=module.down_proj_bias)
    if kind == "swiglu_oss":
        kw.update(activation="swiglu_oss", swiglu_alpha=float(module.alpha), swiglu_limit=float(module.limit))
    elif not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        kw.update(activation=act)
    _count("moe_experts")
    out = ops.moe_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj, **kw)
    return out.to(hidden_states.dtype)


# ---- registration ------------------------------------------------------------------

def register() -> None:
    """Register "mixkit" with transformers' interfaces (idempotent; done on import)."""
    AttentionInterface.register(NAME, mixkit_attention)
    AttentionMaskInterface.register(NAME, mixkit_mask)
    if ExpertsInterface is not None:
        ExpertsInterface.register(NAME, mixkit_experts)


register()


# ---- module swaps ------------------------------------------------------------------

def _rms_forward(self, hidden_states):
    if self.weight.dtype != hidden_states.dtype:
        _count("fallback: norm weight and input differ in dtype")
        return self._mixkit_base.forward(self, hidden_states)
    _count("rms_norm")
    return ops.rms_norm(hidden_states.contiguous(), self.weight, eps=self.variance_epsilon)


def _unit_offset_rms_forward(self, x):
    """Gemma's RMSNorm, y = norm(x) * (1 + w): 1 + w formed in float32 (as
    transformers does) and rounded once to x's dtype for the kernel."""
    _count("rms_norm")
    return ops.rms_norm(x.contiguous(), (1.0 + self.weight.float()).to(x.dtype), eps=self.eps)


def _layer_norm_forward(self, hidden_states):
    _count("layer_norm")
    return ops.layer_norm(hidden_states.contiguous(), eps=1e-5)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers' attention forward of every supported family, with
    ops.rope in place of apply_rotary_pos_emb: q and k are rotated in
    (B, S, heads, D) layout straight from the projections (after the q/k
    norms and clip_qkv where the family has them), from position_ids (what
    transformers' rotary module turns into cos/sin), with the layer's RoPE
    base and scaling. The attention call gets what the family's own forward
    passes: the layer's window, Gemma 2's softcap, gpt-oss's sinks."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        _count("fallback: rope without position_ids")
        return self._mixkit_base.forward(self, hidden_states, position_embeddings, attention_mask, cache=cache,
                                         **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    per_head = q_norm is not None and q_norm.weight.shape[0] == self.head_dim
    if q_norm is not None and not per_head:  # OLMo 2, OLMoE: over the whole projection
        q, k = q_norm(q), k_norm(k)
    clip = getattr(self.config, "clip_qkv", None)
    if clip is not None:  # OLMo, OLMoE
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q, k = q.view(hidden_shape), k.view(hidden_shape)
    if per_head:  # Qwen3, Gemma 3
        q, k = q_norm(q), k_norm(k)
    b, s = input_shape
    theta, scaling = self._mixkit_rope
    q, k = ops.rope(q, k, position_ids.expand(b, s), theta=theta, scaling=scaling)
    _count("rope")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(hidden_shape).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = getattr(sys.modules[self._mixkit_base.__module__], "eager_attention_forward")
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    extra = {}
    name = type(self).__name__
    if hasattr(self, "sliding_window"):  # the families with per-layer windows keep the layer's
        extra["sliding_window"] = self.sliding_window
    elif name.startswith(("Mistral", "Mixtral", "Olmoe")):  # the ones whose forward passes the config's
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    if name.startswith("Gemma2"):
        extra["softcap"] = self.attn_logit_softcapping
    if getattr(self, "sinks", None) is not None:  # gpt-oss
        extra["s_aux"] = self.sinks
    dropout = 0.0 if not self.training else self.attention_dropout
    out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **extra,
                             **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


_SUBCLASSES: dict = {}


def _swap(module, forward, **attrs) -> bool:
    """Give module a subclass of its class (same name, module and qualname, so
    isinstance, state_dict keys, _no_split_modules and hooks are unchanged)
    whose forward is mixkit's. False if it already has one."""
    cls = type(module)
    if getattr(cls, "_mixkit_base", None) is not None:
        for key, value in attrs.items():
            setattr(module, key, value)
        return False
    sub = _SUBCLASSES.get((cls, forward))
    if sub is None:
        sub = type(cls.__name__, (cls,), {"forward": forward, "_mixkit_base": cls, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _SUBCLASSES[(cls, forward)] = sub
    module.__class__ = sub
    for key, value in attrs.items():
        setattr(module, key, value)
    return True


def _restore(module) -> bool:
    base = getattr(type(module), "_mixkit_base", None)
    if base is None:
        return False
    module.__class__ = base
    return True


def _rope_params(config, layer_type=None):
    """((theta, scaling or None), None) for one attention layer, or (None,
    why not). Gemma 3 keeps one rope_parameters per layer type."""
    from .ops.rope import scaling_kind

    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        return None, "no rope_theta in the config"
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        return None, "partial rotary embedding"
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type") == "yarn":  # transformers reads these from the config when absent
        scaling.setdefault("original_max_position_embeddings", getattr(config, "original_max_position_embeddings",
                                                                       config.max_position_embeddings))
        if scaling.get("factor") is None:
            scaling["max_position_embeddings"] = config.max_position_embeddings
    try:
        kind = scaling_kind(scaling)
    except (TypeError, ValueError) as e:
        return None, f"{e} (mixkit.ops.rope computes default, linear and yarn)"
    return (float(theta), None if kind == "default" else scaling), None


def _family(model) -> str | None:
    """The supported family a model class belongs to (also for a user's
    subclass of one), or None."""
    for cls in type(model).__mro__:
        parts = cls.__module__.split(".")
        if len(parts) >= 4 and parts[:2] == ["transformers", "models"] and parts[2] in SUPPORTED:
            return None if cls.__name__ in _UNSUPPORTED_CLASSES else parts[2]
    return None


_SAVED = weakref.WeakKeyDictionary()


def patch(model, *, attention: bool = True, norms: bool = True, rope: bool = True, moe: bool = True,
          strict: bool = False) -> dict:
    """Put mixkit's ops into a loaded model of a supported family (SUPPORTED:
    Mistral, Mixtral, Llama, OLMo, OLMo 2, OLMoE, Qwen3-MoE, Ministral,
    Gemma 2, Gemma 3 text, gpt-oss), any of its classes: the base model,
    the causal LM, the sequence and token classification and QA heads.

    Returns {"model", "patched": {part: what}, "left_alone": {part: why},
    "falls_back": [conditions under which attention calls use HF's path]}.
    Idempotent; `unpatch(model)` undoes it. strict=True raises where a part
    cannot be patched, and makes attention calls raise MixkitFallback where
    they would fall back.
    """
    name = type(model).__name__
    family = _family(model)
    if family is None:
        raise TypeError(f"mixkit.hf.patch supports the model classes of transformers' {', '.join(SUPPORTED)} "
                        f"(not {', '.join(_UNSUPPORTED_CLASSES)}); got {name}")
    config = model.config
    saved = _SAVED.setdefault(model, {"attn": config._attn_implementation,
                                      "experts": getattr(config, "_experts_implementation", None)})
    patched, left = {}, {}

    prefix = f"transformers.models.{family}."
    attn_modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")
                    and type(m).__module__.startswith(prefix)]
    if attention:
        if config._attn_implementation != NAME:
            model.set_attn_implementation(NAME)
        for m in attn_modules:
            m.mixkit_strict = strict
        patched["attention"] = f"'{NAME}' attention in {len(attn_modules)} layers"
    else:
        left["attention"] = "not requested"

    if norms:
        count = 0
        for m in model.modules():
            cname = type(m).__name__
            if cname.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
                _swap(m, _rms_forward)
                count += 1
            elif cname in ("Gemma2RMSNorm", "Gemma3RMSNorm") and hasattr(m, "eps"):
                _swap(m, _unit_offset_rms_forward)
                count += 1
            elif cname == "OlmoLayerNorm":
                _swap(m, _layer_norm_forward)
                count += 1
        patched["norms"] = f"{count} norm modules -> mixkit.ops.rms_norm / layer_norm"
    else:
        left["norms"] = "not requested"

    if rope:
        per_layer = [_rope_params(config, getattr(m, "layer_type", None)) for m in attn_modules]
        why = next((w for p, w in per_layer if p is None), None)
        if why is not None:
            if strict:
                raise MixkitFallback(f"mixkit.hf.patch: RoPE left alone: {why}")
            left["rope"] = why
        else:
            for m, (params, _) in zip(attn_modules, per_layer):
                _swap(m, _attention_forward, _mixkit_rope=params)
            kinds = sorted({f"theta {t:g}" + (f" {sc['rope_type']}" if sc else "") for (t, sc), _ in per_layer})
            patched["rope"] = f"mixkit.ops.rope ({', '.join(kinds)}) in {len(attn_modules)} attention layers"
    else:
        left["rope"] = "not requested"

    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if not experts:
        left["moe"] = "no experts in this model"
    elif not moe:
        left["moe"] = "not requested"
    elif ExpertsInterface is None:
        left["moe"] = f"transformers {transformers.__version__} has no experts interface"
    else:
        why = _experts_fallback(experts[0])
        if why is not None:
            if strict:
                raise MixkitFallback(f"mixkit.hf.patch: experts left alone: {why}")
            left["moe"] = why
        else:
            if getattr(config, "_experts_implementation", None) != NAME:
                model.set_experts_implementation(NAME)
            patched["moe"] = f"mixkit.ops.moe_experts in {len(experts)} layers (HF's router kept)"

    for m in attn_modules:
        m.mixkit_strict = strict
    return {"model": name, "patched": patched, "left_alone": left, "falls_back": list(FALLBACKS)}


FALLBACKS = (
    "user-supplied 4D attention masks",
    "custom mask functions (or_mask/and_mask) and padding masks with holes",
    "output_attentions (eager, which computes the weights)",
    "attention dropout in training",
    "non-causal attention",
    "GPU: dtypes other than bfloat16/float16 for prefill; head dims and features the kernels lack",
)


def unpatch(model) -> None:
    """Undo patch(): HF's classes, attention and experts implementations back."""
    for m in model.modules():
        _restore(m)
        if hasattr(m, "mixkit_strict"):
            del m.mixkit_strict
    saved = _SAVED.pop(model, None)
    if saved is None:
        return
    if model.config._attn_implementation != saved["attn"]:
        model.set_attn_implementation(saved["attn"])
    if saved["experts"] is not None and getattr(model.config, "_experts_implementation", None) != saved["experts"]:
        model.set_experts_implementation(saved["experts"])
