"""`load(path)`: a Hugging Face checkpoint directory (config.json + safetensors,
sharded or not) or Mistral's native one (params.json + consolidated.safetensors).

The model is built on the meta device, then materialised once on the target
device in the target dtype; each checkpoint tensor is read through
safetensors' mmap and copied straight into its slice of the fused parameter,
so at most one tensor is held twice. Keys and shapes are all checked before
any data is read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelArgs, from_hf_config, from_mistral_params
from .model import Transformer


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the key."""


class Relayout:
    """A stored tensor whose layout differs from the parameter's: `load`
    turns the stored tensor into the parameter's layout, `save` back, and
    `stored_shape` gives the shape the checkpoint must have. gpt-oss keeps
    its experts as (E, in, out) with gate and up columns interleaved; mixkit
    keeps nn.Linear's (E, out, in) with the gate rows first."""

    def __init__(self, load, save, stored_shape):
        self.load, self.save, self.stored_shape = load, save, stored_shape

    def __call__(self, tensor):
        return self.load(tensor)


def _deinterleave(t):  # (..., 2F): gate, up, gate, up ... -> gate block, up block
    return torch.cat([t[..., 0::2], t[..., 1::2]], -1)


def _interleave(t):
    f = t.shape[-1] // 2
    return torch.stack([t[..., :f], t[..., f:]], -1).flatten(-2)


# gate_up_proj (E, H, 2F) interleaved <-> w13 (E, 2F, H); down_proj (E, F, H) <-> w2 (E, H, F);
# gate_up_proj_bias (E, 2F) interleaved <-> b13 (E, 2F).
_OSS_W13 = Relayout(lambda t: _deinterleave(t).transpose(1, 2), lambda t: _interleave(t.transpose(1, 2)),
                    lambda shape: (shape[0], shape[2], shape[1]))
_OSS_W2 = Relayout(lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2), lambda shape: (shape[0], shape[2], shape[1]))
_OSS_B13 = Relayout(_deinterleave, _interleave, tuple)

# Norm modules by placement: (HF name, mixkit name) per layer.
_NORMS = {
    "pre": (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")),
    "post": (("post_attention_layernorm", "post_attention_norm"), ("post_feedforward_layernorm", "post_ffn_norm")),
    "sandwich": (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "post_attention_norm"),
                 ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffn_norm")),
}


def _hf_map(args: ModelArgs, keys: set[str]) -> tuple[dict, set]:
    """checkpoint key -> (parameter name, index into it or None, transform or None);
    plus keys that may be present and are skipped."""
    h, hkv, i_dim, e_dim = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim,
                            args.expert_dim)
    m, optional = {"model.embed_tokens.weight": ("tok_embeddings.weight", None, None)}, set()
    if args.tie_embeddings:
        optional.add("lm_head.weight")
    else:
        m["lm_head.weight"] = ("output.weight", None, None)
    if args.norm == "rms":
        m["model.norm.weight"] = ("norm.weight", None, None)
    suffixes = ("weight", "bias") if args.bias else ("weight",)
    fused_experts = any(".mlp.experts.gate_up_proj" in k for k in keys)
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        optional.add(src + "self_attn.rotary_emb.inv_freq")
        for s in suffixes:
            qkv = dst + "attention.wqkv." + s
            m[src + "self_attn.q_proj." + s] = (qkv, slice(0, h), None)
            m[src + "self_attn.k_proj." + s] = (qkv, slice(h, h + hkv), None)
            m[src + "self_attn.v_proj." + s] = (qkv, slice(h + hkv, h + 2 * hkv), None)
            m[src + "self_attn.o_proj." + s] = (dst + "attention.wo." + s, None, None)
        if args.qk_norm:
            m[src + "self_attn.q_norm.weight"] = (dst + "attention.q_norm.weight", None, None)
            m[src + "self_attn.k_norm.weight"] = (dst + "attention.k_norm.weight", None, None)
        if args.attn_sinks:
            m[src + "self_attn.sinks"] = (dst + "attention.sinks", None, None)
        if args.norm == "rms":
            for theirs, ours in _NORMS[args.norm_placement]:
                m[src + theirs + ".weight"] = (dst + ours + ".weight", None, None)
        ff = dst + "feed_forward."
        if not args.is_moe(i):
            for s in suffixes:
                m[src + "mlp.gate_proj." + s] = (ff + "w13." + s, slice(0, i_dim), None)
                m[src + "mlp.up_proj." + s] = (ff + "w13." + s, slice(i_dim, 2 * i_dim), None)
                m[src + "mlp.down_proj." + s] = (ff + "w2." + s, None, None)
        elif args.moe_activation == "swiglu_oss":  # gpt-oss: only the fused, interleaved layout exists
            m[src + "mlp.router.weight"] = (ff + "gate.weight", None, None)
            if args.moe_router_bias:
                m[src + "mlp.router.bias"] = (ff + "gate.bias", None, None)
            m[src + "mlp.experts.gate_up_proj"] = (ff + "w13", None, _OSS_W13)
            m[src + "mlp.experts.down_proj"] = (ff + "w2", None, _OSS_W2)
            if args.moe_expert_bias:
                m[src + "mlp.experts.gate_up_proj_bias"] = (ff + "b13", None, _OSS_B13)
                m[src + "mlp.experts.down_proj_bias"] = (ff + "b2", None, None)
        elif fused_experts:  # newer transformers saves
            m[src + "mlp.gate.weight"] = (ff + "gate.weight", None, None)
            m[src + "mlp.experts.gate_up_proj"] = (ff + "w13", None, None)
            m[src + "mlp.experts.down_proj"] = (ff + "w2", None, None)
        elif args.family is None:  # Mixtral's original per-expert keys
            m[src + "block_sparse_moe.gate.weight"] = (ff + "gate.weight", None, None)
            for j in range(args.moe_num_experts):
                e = f"{src}block_sparse_moe.experts.{j}."
                m[e + "w1.weight"] = (ff + "w13", (j, slice(0, e_dim)), None)
                m[e + "w3.weight"] = (ff + "w13", (j, slice(e_dim, 2 * e_dim)), None)
                m[e + "w2.weight"] = (ff + "w2", j, None)
        else:  # OLMoE, Qwen3-MoE: mlp.experts.{j}.{gate,up,down}_proj
            m[src + "mlp.gate.weight"] = (ff + "gate.weight", None, None)
            for j in range(args.moe_num_experts):
                e = f"{src}mlp.experts.{j}."
                m[e + "gate_proj.weight"] = (ff + "w13", (j, slice(0, e_dim)), None)
                m[e + "up_proj.weight"] = (ff + "w13", (j, slice(e_dim, 2 * e_dim)), None)
                m[e + "down_proj.weight"] = (ff + "w2", j, None)
    return m, optional


def native_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from Meta/Mistral's interleaved RoPE layout
    to the half-split one (the HF converter's permutation, CONVENTIONS.md)."""
    dim = w.shape[-1]
    hd = w.shape[0] // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(n_heads * hd, dim)


def _native_map(args: ModelArgs, keys: set[str]) -> tuple[dict, set]:
    h, hkv, i_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    # Heads counted from the rows, so a tensor-parallel shard of whole heads permutes the same way.
    perm_q = perm_k = lambda w: native_to_half_split(w, w.shape[0] // args.head_dim)  # noqa: E731
    m = {"tok_embeddings.weight": ("tok_embeddings.weight", None, None), "norm.weight": ("norm.weight", None, None),
         "output.weight": ("output.weight", None, None)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        qkv = p + "attention.wqkv.weight"
        m[p + "attention.wq.weight"] = (qkv, slice(0, h), perm_q)
        m[p + "attention.wk.weight"] = (qkv, slice(h, h + hkv), perm_k)
        m[p + "attention.wv.weight"] = (qkv, slice(h + hkv, h + 2 * hkv), None)
        m[p + "attention.wo.weight"] = (p + "attention.wo.weight", None, None)
        m[p + "attention_norm.weight"] = (p + "attention_norm.weight", None, None)
        m[p + "ffn_norm.weight"] = (p + "ffn_norm.weight", None, None)
        ff = p + "feed_forward."
        if args.moe_num_experts:
            m[ff + "gate.weight"] = (ff + "gate.weight", None, None)
            for j in range(args.moe_num_experts):
                e = f"{ff}experts.{j}."
                m[e + "w1.weight"] = (ff + "w13", (j, slice(0, i_dim)), None)
                m[e + "w3.weight"] = (ff + "w13", (j, slice(i_dim, 2 * i_dim)), None)
                m[e + "w2.weight"] = (ff + "w2", j, None)
        else:
            m[ff + "w1.weight"] = (ff + "w13.weight", slice(0, i_dim), None)
            m[ff + "w3.weight"] = (ff + "w13.weight", slice(i_dim, 2 * i_dim), None)
            m[ff + "w2.weight"] = (ff + "w2.weight", None, None)
    return m, set()


def _files(path: Path, native: bool) -> list[Path]:
    if native:
        files = [path / "consolidated.safetensors"]
    elif (path / "model.safetensors.index.json").exists():
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights found")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path}: weights file {f.name} is missing")
    return files


def _scan(files: list[Path]) -> dict[str, tuple[Path, tuple, str]]:
    """key -> (file, shape, dtype) from the safetensors headers, reading no data."""
    from safetensors import safe_open

    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # safetensors raises its own error type for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
    return found


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _progress(total: int, nbytes: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tensor", desc="loading", disable=nbytes < 2 ** 30)


def load(path, dtype: torch.dtype | None = None, device=None, default_rope_theta: float | None = None,
         mesh=None, parallel: str = "tp") -> Transformer:
    """Load a checkpoint directory into a Transformer (in eval mode).

    HF: config.json (Mistral/Mixtral/Llama/OLMo architectures) with
    model.safetensors, or shards listed in model.safetensors.index.json.
    Mistral native: params.json + consolidated.safetensors; q/k rows are
    permuted to the half-split RoPE layout; `default_rope_theta` applies when
    params.json has no rope_theta (see config.NATIVE_DEFAULT_ROPE_THETA).
    dtype: default the checkpoint's; device: default CPU. Raises
    CheckpointError naming the key for missing, unexpected or misshapen tensors.

    mesh: a 1-D torch.distributed DeviceMesh (every rank calls load): the
    model comes back tensor-parallel (parallel="tp", mixkit.parallel.
    tensor_parallel) or expert-parallel ("ep"), and each rank reads only its
    shard of each tensor from the safetensors files (sliced reads), so no
    rank ever holds the full model.
    """
    path = Path(path)
    native = not (path / "config.json").exists() and (path / "params.json").exists()
    if native:
        params = json.loads((path / "params.json").read_text())
        kw = {} if default_rope_theta is None else {"default_rope_theta": default_rope_theta}
        args = from_mistral_params(params, **kw)
    elif (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        args = from_hf_config(cfg)
    else:
        raise CheckpointError(f"{path}: neither config.json (Hugging Face) nor params.json (Mistral native) found")
    files = _files(path, native)
    found = _scan(files)
    mapping, optional = (_native_map if native else _hf_map)(args, set(found))

    for key in sorted(found):
        if key not in mapping and key not in optional:
            raise CheckpointError(f"unexpected tensor {key!r} in {found[key][0].name}: the {type(args).__name__} "
                                  f"built from the config has no place for it")
    for key in mapping:
        if key not in found:
            raise CheckpointError(f"missing tensor {key!r}: not in {', '.join(f.name for f in files)}")

    if dtype is None:
        name = None if native else (cfg.get("dtype") or cfg.get("torch_dtype"))
        dtype = getattr(torch, name) if isinstance(name, str) else _ST_DTYPES.get(next(iter(found.values()))[2],
                                                                                   torch.float32)
    device = torch.device(device or "cpu")
    splits, finish = {}, None
    if mesh is not None:  # validates the mesh and the counts on every rank before anything is read
        from ..parallel import shard_plan
        splits, finish = shard_plan(args, mesh, parallel)
    with torch.device("meta"):
        model = Transformer(args)
    params = dict(model.named_parameters())
    uncovered = set(params) - {name for name, _, _ in mapping.values()}
    if uncovered:  # a bug in the key maps above, not in the checkpoint
        raise CheckpointError(f"no checkpoint key fills parameter {sorted(uncovered)[0]!r}")
    for key, (name, index, transform) in mapping.items():  # against the full (meta) shapes
        target = params[name].data if index is None else params[name].data[index]
        shape = found[key][1]
        expect = tuple(target.shape)
        if isinstance(transform, Relayout):
            expect = transform.stored_shape(expect)
            if name in splits:
                raise CheckpointError(f"{key!r}: its stored layout differs from mixkit's; loading it sharded "
                                      f"(mesh=) is not supported")
        if shape != expect:
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {shape}, the model expects "
                                  f"{expect} (parameter {name})")
    full_shapes = {name: tuple(p.shape) for name, p in params.items()}
    if splits:
        from ..parallel.tensor import shard_parameters
        shard_parameters(model, splits)  # on the meta device: only the local shapes change
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty makes new parameters, which unties them
    params = dict(model.named_parameters())

    from safetensors import safe_open

    bar = _progress(len(mapping), sum(f.stat().st_size for f in files))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key not in mapping:
                    continue
                name, index, transform = mapping[key]
                split = splits.get(name)
                # (source slices of the stored tensor, index into the local parameter); () reads it whole
                pieces = [((), index)] if split is None else split.pieces(index, full_shapes[name])
                for src, dst in pieces:
                    tensor = f.get_slice(key)[src] if src else f.get_tensor(key)
                    if transform is not None:
                        tensor = transform(tensor)
                    target = params[name].data if dst is None else params[name].data[dst]
                    target.copy_(tensor)  # converts dtype and moves to the device in one copy
                    del tensor
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    if finish is not None:
        model = finish(model)
    return model.eval()


def to_hf_config(args: ModelArgs) -> dict:
    """A Hugging Face config.json dict for `args`: the inverse of from_hf_config."""
    if args.rope_interleaved:
        raise ValueError("save: interleaved-RoPE models have no Hugging Face layout; load them half-split")
    if args.family is not None:
        return _family_config(args)
    if args.layer_types is not None or args.rope_scaling is not None or args.qk_norm or \
            args.norm_placement != "pre":
        raise ValueError("save: these ModelArgs need a family (the Hugging Face model_type) to be saved")
    if args.norm == "layer_np":
        arch, model_type = "OlmoForCausalLM", "olmo"
    elif args.moe_num_experts:
        arch, model_type = "MixtralForCausalLM", "mixtral"
    elif args.sliding_window is not None:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    cfg = dict(architectures=[arch], model_type=model_type, hidden_size=args.dim, num_hidden_layers=args.n_layers,
               num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
               intermediate_size=args.hidden_dim, vocab_size=args.vocab_size, rope_theta=args.rope_theta,
               max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
               hidden_act="silu", attention_bias=args.bias, mlp_bias=args.bias)
    if args.norm == "rms":
        cfg["rms_norm_eps"] = args.norm_eps
    if args.clip_qkv is not None:
        cfg["clip_qkv"] = args.clip_qkv
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        cfg["sliding_window"] = args.sliding_window
    if args.moe_num_experts:
        cfg.update(num_local_experts=args.moe_num_experts, num_experts_per_tok=args.moe_top_k)
    return cfg


def _scalar(x: float):
    """Gemma's query_pre_attn_scalar is an int in transformers' config: the
    one that the stored softmax scale came from."""
    return int(round(x)) if abs(x - round(x)) <= 1e-6 * x else x


def _family_config(args: ModelArgs) -> dict:
    """config.json of the newer families, in transformers 5's spelling."""
    from .config import _CAUSAL_LM

    fam = args.family
    cfg = dict(architectures=[_CAUSAL_LM[fam]], model_type=fam, hidden_size=args.dim,
               num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
               num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, intermediate_size=args.hidden_dim,
               vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
               tie_word_embeddings=args.tie_embeddings, rms_norm_eps=args.norm_eps, attention_bias=args.bias,
               rope_parameters={"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "default"})})
    if fam in ("ministral", "gemma2", "gemma3_text", "gpt_oss"):
        cfg.update(layer_types=[args.layer_type(i) for i in range(args.n_layers)], sliding_window=args.sliding_window)
    if fam == "qwen3_moe":
        cfg.update(use_sliding_window=args.sliding_window is not None, sliding_window=args.sliding_window)
    if fam in ("gemma2", "gemma3_text"):
        cfg.update(hidden_activation="gelu_pytorch_tanh" if args.activation == "gelu_tanh" else "silu",
                   query_pre_attn_scalar=_scalar((args.attn_scale or args.head_dim ** -0.5) ** -2),
                   final_logit_softcapping=args.final_softcap, attn_logit_softcapping=args.attn_softcap)
    else:
        cfg["hidden_act"] = "silu"
    if fam == "gemma3_text":
        cfg["rope_parameters"] = {"full_attention": cfg["rope_parameters"],
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": args.rope_local_theta or args.rope_theta}}
    if fam in ("olmoe", "olmo2") and args.clip_qkv is not None:
        cfg["clip_qkv"] = args.clip_qkv
    if args.moe_num_experts:
        cfg.update(num_experts_per_tok=args.moe_top_k)
        cfg["num_local_experts" if fam in ("gpt_oss", "qwen3_moe") else "num_experts"] = args.moe_num_experts
    if fam in ("olmoe", "qwen3_moe"):
        cfg["norm_topk_prob"] = args.moe_renormalize
    if fam == "qwen3_moe":
        cfg.update(moe_intermediate_size=args.expert_dim, decoder_sparse_step=1,
                   mlp_only_layers=list(args.moe_dense_layers))
    if fam == "gpt_oss":
        cfg.update(swiglu_alpha=args.moe_swiglu_alpha, swiglu_limit=args.moe_swiglu_limit)
    if args.moe_aux_loss_coef is not None:
        cfg["router_aux_loss_coef"] = args.moe_aux_loss_coef
    return cfg


def save(model: Transformer, path, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json +
    model.safetensors, per-expert Mixtral keys) that `load` and
    `transformers` read; the fused qkv and w13 parameters are split back into
    their projections. dtype: default the model's."""
    from safetensors.torch import save_file

    if getattr(model, "tp_mesh", None) is not None or getattr(model, "ep_mesh", None) is not None:
        raise ValueError("save: the model is tensor- or expert-parallel and each rank holds only its shard; save "
                         "the full model (or, in training, Trainer.model_state_dict() gathered into a Transformer)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    mapping, _ = _hf_map(model.args, set())
    tensors = {}
    for key, (name, index, transform) in mapping.items():
        t = params[name].detach()
        t = t if index is None else t[index]
        if isinstance(transform, Relayout):
            t = transform.save(t)
        tensors[key] = t.to(dtype or t.dtype).contiguous().cpu()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(to_hf_config(model.args), indent=2) + "\n")
    return path
