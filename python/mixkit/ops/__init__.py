"""mixkit ops: each is a torch.library op in the `mixkit` namespace with a fake
implementation (and autograd where differentiable), so it works in eager,
torch.compile(fullgraph=True) and CUDA graphs. These functions are the public API."""
from .decode import decode_attn, decode_attn_paged, kv_cache_append
from .flash_attn import flash_attn, flash_attn_fwd_arch, flash_attn_varlen
from .moe import moe_permute, moe_route, moe_unpermute
from .moe_mlp import (grouped_gemm, grouped_gemm_wgrad, grouped_swiglu, moe_aux_loss, moe_experts, moe_mlp,
                      swiglu_oss)
from .norm import layer_norm, rms_norm, rms_norm_residual
from .paged import paged_kv_append, paged_prefill_attn
from .prefill import prefill_attn
from .rope import rope, rope_frequencies

__all__ = ["rms_norm", "rms_norm_residual", "layer_norm", "rope", "rope_frequencies", "moe_route", "moe_permute",
           "moe_unpermute", "grouped_gemm", "grouped_gemm_wgrad", "grouped_swiglu", "moe_mlp", "moe_experts",
           "moe_aux_loss", "swiglu_oss", "kv_cache_append", "decode_attn", "decode_attn_paged", "paged_kv_append",
           "paged_prefill_attn",
           "flash_attn", "flash_attn_varlen", "flash_attn_fwd_arch", "prefill_attn"]
