"""mixkit.models.load: HF directories (single file, sharded, both Mixtral
expert layouts), Mistral's native format, and errors that name the key."""
from __future__ import annotations

import json

import pytest
import torch

from mixkit.models import CheckpointError, load
from mixkit.models.loading import native_to_half_split

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_models import VOCAB, hf_model, save_hf  # noqa: E402

TOKENS = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(0))


def assert_same_logits(hf, ours):
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf(TOKENS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_sharded(tmp_path, family):
    hf = hf_model(family)
    save_hf(hf, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_logits(hf, load(tmp_path))


def test_mixtral_fused_expert_keys(tmp_path):
    """Newer transformers keep experts fused: mlp.experts.gate_up_proj (E, 2I, H),
    mlp.experts.down_proj (E, H, I) and the router in mlp.gate."""
    hf = hf_model("mixtral")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    assert_same_logits(hf, load(tmp_path))


def test_dtype_device_and_tied(tmp_path):
    hf = hf_model("olmo")
    model = load(save_hf(hf, tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.tok_embeddings.weight.float(),
                               hf.model.embed_tokens.weight.bfloat16().float())


def half_split_to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the HF converter's permutation (CONVENTIONS.md)."""
    dim = w.shape[-1]
    hd = w.shape[0] // n_heads
    return w.view(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(n_heads * hd, dim)


def write_native(hf, path, with_theta: bool):
    cfg = hf.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        s, d = f"model.layers.{i}.", f"layers.{i}."
        out[d + "attention.wq.weight"] = half_split_to_native(sd[s + "self_attn.q_proj.weight"], nh).contiguous()
        out[d + "attention.wk.weight"] = half_split_to_native(sd[s + "self_attn.k_proj.weight"], nkv).contiguous()
        out[d + "attention.wv.weight"] = sd[s + "self_attn.v_proj.weight"]
        out[d + "attention.wo.weight"] = sd[s + "self_attn.o_proj.weight"]
        out[d + "attention_norm.weight"] = sd[s + "input_layernorm.weight"]
        out[d + "ffn_norm.weight"] = sd[s + "post_attention_layernorm.weight"]
        if s + "mlp.experts.gate_up_proj" in sd:
            gate_up, down = sd[s + "mlp.experts.gate_up_proj"], sd[s + "mlp.experts.down_proj"]
            inter = gate_up.shape[1] // 2
            out[d + "feed_forward.gate.weight"] = sd[s + "mlp.gate.weight"]
            for j in range(gate_up.shape[0]):
                e = f"{d}feed_forward.experts.{j}."
                out[e + "w1.weight"] = gate_up[j, :inter].contiguous()
                out[e + "w3.weight"] = gate_up[j, inter:].contiguous()
                out[e + "w2.weight"] = down[j].contiguous()
        else:
            out[d + "feed_forward.w1.weight"] = sd[s + "mlp.gate_proj.weight"]
            out[d + "feed_forward.w3.weight"] = sd[s + "mlp.up_proj.weight"]
            out[d + "feed_forward.w2.weight"] = sd[s + "mlp.down_proj.weight"]
    safetensors_torch.save_file(out, path / "consolidated.safetensors")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": cfg.head_dim,
              "hidden_dim": cfg.intermediate_size, "n_heads": nh, "n_kv_heads": nkv, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "sliding_window": getattr(cfg, "sliding_window", None)}
    if with_theta:
        params["rope_theta"] = cfg.rope_parameters["rope_theta"]
    if hasattr(cfg, "num_local_experts"):
        params["moe"] = {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}
    (path / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_native_mistral_format(tmp_path, family):
    hf = hf_model(family)
    # Mistral 7B v0.1's params.json has no rope_theta: the documented default 1e4 applies.
    write_native(hf, tmp_path, with_theta=family == "mixtral")
    model = load(tmp_path)
    assert model.args.rope_theta == (1e6 if family == "mixtral" else 1e4)
    assert_same_logits(hf, model)


def test_native_permutation_round_trip():
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(native_to_half_split(half_split_to_native(w, 3), 3), w, atol=0, rtol=0)


# ---- errors ---------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    return save_hf(hf_model("llama"), tmp_path)


def _edit(path, fn):
    st = path / "model.safetensors"
    tensors = safetensors_torch.load_file(st)
    fn(tensors)
    safetensors_torch.save_file(tensors, st)


def test_missing_tensor(llama_dir):
    _edit(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(llama_dir)


def test_unexpected_tensor(llama_dir):
    _edit(llama_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load(llama_dir)


def test_shape_mismatch(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["intermediate_size"] = 64  # the weights have 96
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.gate_proj\.weight'"):
        load(llama_dir)


def test_unknown_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'GPT2LMHeadModel'"):
        load(llama_dir)


def test_truncated_file(llama_dir):
    st = llama_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(llama_dir)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json"):
        load(tmp_path)


def test_cli_generate_from_checkpoint(llama_dir, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins the words with spaces
    tok.save(str(llama_dir / "tokenizer.json"))
    from mixkit.cli import main

    assert main(["generate", "--checkpoint", str(llama_dir), "--prompt", "w5 w9 w17", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("w5 w9 w17") and "6 tokens" in out.err


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-mixtral", "tiny-llama", "tiny-olmo"])
def test_save_round_trips_and_transformers_reads_it(name, tmp_path):
    """mixkit.models.save writes a Hugging Face directory: mixkit reloads it
    exactly, and transformers' own model gives the same logits (float32
    rounding only, as in test_models.py)."""
    import transformers

    from mixkit.models import CONFIGS, Transformer, save

    model = Transformer(CONFIGS[name]).init_weights(0, std=0.1).eval()
    save(model, tmp_path)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = model(tokens)
        assert torch.equal(load(tmp_path)(tokens), want)
        torch.testing.assert_close(hf(tokens).logits, want, atol=1e-4, rtol=0)
