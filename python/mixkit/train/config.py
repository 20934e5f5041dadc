"""TrainConfig: the training run's settings, from TOML with flag overrides.

    cfg = load_config("run.toml", ["lr=6e-4", "model.n_layers=4"])

The TOML file holds TrainConfig fields at the top level and, optionally, a
`[model]` table of ModelArgs fields that override the named `model_name`
config. An unknown key anywhere raises ConfigError naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..models.config import CONFIGS, ModelArgs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # model: a named config (mixkit.models.CONFIGS) plus ModelArgs overrides
    model_name: str = "tiny-llama"
    model: dict[str, Any] = field(default_factory=dict)

    # AdamW, OLMo / Llama 2 settings
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = False  # weight decay on 1-D parameters too
    decay_embeddings: bool = False  # weight decay on the token embedding (and a head tied to it)

    # schedule: linear warmup, then cosine or linear decay to min_lr_ratio * lr at max_steps
    warmup_steps: int = 2000
    max_steps: int = 100_000
    decay: str = "cosine"  # "cosine" or "linear"
    min_lr_ratio: float = 0.1

    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping (the norm is still reported)
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "bf16"  # "bf16": bf16 compute, float32 master weights and grads; "fp32"
    activation_checkpointing: bool = False
    # GPU attention backward without atomics, so that a resumed run repeats
    # the uninterrupted one bit for bit (the CPU is always deterministic).
    deterministic: bool = False
    moe_aux_loss_coef: float = 0.02  # Mixtral / HF router_aux_loss_coef; 0 disables
    loss_chunk_size: int = 4096  # tokens per chunk of the cross-entropy

    # Loss spikes (train/spikes.py): after warmup, a step whose loss exceeds
    # spike_factor x the median of the previous spike_window steps is logged
    # as a warning; skip_spikes also drops its update. 0 disables the check.
    spike_factor: float = 1.3
    spike_window: int = 20
    skip_spikes: bool = False

    seed: int = 0
    eval_every: int = 0  # steps; 0: never
    log_every: int = 1
    checkpoint_every: int = 0  # steps; 0: only when stopped by a signal and at the end (mixkit train)
    checkpoint_dir: str = ""  # mixkit train: "" is the run directory (data.out_dir)
    keep_last: int = 3  # complete checkpoints kept in checkpoint_dir, newest first; 0: all
    peak_flops: float = 0.0  # per device, for MFU; 0: no MFU
    fsdp: bool | None = None  # None: FSDP2 when torch.distributed has more than one rank
    ep: int = 1  # expert parallelism: MoE experts split over ep ranks, FSDP2 over (ranks / ep, ep)

    def __post_init__(self):
        if self.model_name not in CONFIGS:
            raise ConfigError(f"TrainConfig: unknown model_name {self.model_name!r}; known: {sorted(CONFIGS)}")
        fields = {f.name for f in dataclasses.fields(ModelArgs)}
        for key in self.model:
            if key not in fields:
                raise ConfigError(f"TrainConfig: unknown model key {key!r} (ModelArgs fields: {sorted(fields)})")
        if self.decay not in ("cosine", "linear"):
            raise ConfigError(f"TrainConfig: decay must be 'cosine' or 'linear', got {self.decay!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"TrainConfig: precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.grad_accum < 1 or self.max_steps < 1 or self.warmup_steps < 0 or self.loss_chunk_size < 1:
            raise ConfigError("TrainConfig: grad_accum, max_steps and loss_chunk_size must be >= 1, "
                              "warmup_steps >= 0")
        if self.keep_last < 0 or self.checkpoint_every < 0:
            raise ConfigError("TrainConfig: keep_last and checkpoint_every must be >= 0")
        if isinstance(self.ep, bool) or not isinstance(self.ep, int) or self.ep < 1:
            raise ConfigError(f"TrainConfig: ep must be an integer >= 1, got {self.ep!r}")
        if self.spike_factor and (self.spike_factor <= 1.0 or self.spike_window < 1):
            raise ConfigError(f"TrainConfig: spike_factor must be > 1 (or 0: off) and spike_window >= 1, got "
                              f"{self.spike_factor}, {self.spike_window}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"TrainConfig: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)

    def model_args(self) -> ModelArgs:
        return CONFIGS[self.model_name].replace(**self.model)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _parse_value(text: str):
    """A flag value as a TOML value (3e-4, true, [0.9, 0.95], "x"), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a dict shaped like the TOML file; unknown keys raise ConfigError."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"TrainConfig: unknown key(s) {', '.join(map(repr, unknown))}; known: {sorted(known)}")
    if "model" in values and not isinstance(values["model"], dict):
        raise ConfigError("TrainConfig: 'model' must be a table of ModelArgs fields")
    return TrainConfig(**values)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str], tables: Sequence[str] = ("model",)) -> None:
    """Apply `key=value` overrides to a TOML-shaped dict in place;
    `<table>.<key>=` sets a key of one of `tables` (sub-dicts of values)."""
    for table in tables:
        values[table] = dict(values.get(table, {}))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        key = key.strip().removeprefix("--")
        table, dot, sub = key.partition(".")
        if dot and table in tables:
            values[table][sub] = _parse_value(text.strip())
        else:
            values[key] = _parse_value(text.strip())


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a TOML file (optional) and `key=value` overrides
    (`model.<field>=value` for ModelArgs fields), applied in order."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    apply_overrides(values, overrides)
    return config_from_dict(values)
