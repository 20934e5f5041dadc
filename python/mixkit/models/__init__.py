"""Mistral, Mixtral, Llama 2 and OLMo-1 from mixkit ops: one Transformer
configured by ModelArgs, checkpoint loading and generation."""
from .config import CONFIGS, NATIVE_DEFAULT_ROPE_THETA, ModelArgs, from_hf_config, from_mistral_params
from .generate import generate, sample
from .loading import CheckpointError, load, save, to_hf_config
from .model import KVCache, Transformer

__all__ = ["CONFIGS", "NATIVE_DEFAULT_ROPE_THETA", "ModelArgs", "from_hf_config", "from_mistral_params",
           "generate", "sample", "CheckpointError", "load", "save", "to_hf_config", "KVCache", "Transformer"]
