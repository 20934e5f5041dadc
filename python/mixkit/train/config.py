"""TrainConfig: the training run's settings, from TOML with flag overrides.

    cfg = load_config("run.toml", ["lr=6e-4", "model.n_layers=4"])

The TOML file holds TrainConfig fields at the top level and, optionally, a
`[model]` table of ModelArgs fields that override the named `model_name`
config. An unknown key anywhere raises ConfigError naming it.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from ..models.config import CONFIGS, ModelArgs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib


class ConfigError(ValueError):
    """A run setting that cannot be used; its message is one line per problem."""


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
    # The MoE load-balancing loss weight; None: the model's family's
    # (ModelArgs.moe_aux_loss_coef: OLMoE 0.01, gpt-oss and Qwen3-MoE from
    # their config), else 0.02 (Mixtral); 0 disables.
    moe_aux_loss_coef: float | None = None
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

    def aux_loss_coef(self, args: ModelArgs | None = None) -> float:
        """The load-balancing loss weight this run uses for a model of `args`
        (default model_args()): see moe_aux_loss_coef."""
        if self.moe_aux_loss_coef is not None:
            return self.moe_aux_loss_coef
        family = (args or self.model_args()).moe_aux_loss_coef
        return 0.02 if family is None else family

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _parse_value(text: str):
    """A flag value as a TOML value (3e-4, true, [0.9, 0.95], "x"), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# ---- run files: reading, where each value came from, types --------------------------------------------------

def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


@dataclass
class Sources:
    """Where each value of a run's settings came from: the run file, or a
    `--set key=value` (`set_by` maps dotted keys to the flag)."""
    path: str | None = None
    set_by: dict[str, str] = field(default_factory=dict)

    def _setter(self, key: str) -> str | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.set_by:
                return self.set_by[".".join(parts[:n])]
        return None

    def __call__(self, key: str) -> str:
        """The file or flag that set `key`, for error messages."""
        return self._setter(key) or self.path or "the defaults"

    def resolve(self, key: str, value: str) -> str:
        """A path from the run file is relative to the file's directory; one
        given with --set, to the current directory."""
        if self.path is None or self._setter(key) is not None or not value:
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else Path(self.path).parent / p)


def load_settings(path: str | None, overrides: Sequence[str], tables: Sequence[str]) -> tuple[dict, Sources]:
    """The run file's values (ConfigError naming the file when it is not TOML)
    with `key=value` overrides applied, and where each came from."""
    values = read_toml(path) if path is not None else {}
    bad = [t for t in tables if not isinstance(values.get(t, {}), dict)]
    if bad:
        raise ConfigError(f"{path}: {bad[0]}: expected a table ([{bad[0]}]), got {_show(values[bad[0]])}")
    return values, Sources(path, apply_overrides(values, overrides, tables))


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _describe(tp) -> str:
    """A type as a run file's author reads it: 'an integer', 'a list of strings'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):  # None cannot be written in TOML: the other types
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin is list:
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "any value")


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp in (bool, str):
        return isinstance(value, tp)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, tp)


def _show(value) -> str:
    return "a table" if isinstance(value, dict) else json.dumps(value, ensure_ascii=False, default=str)


def type_errors(values: dict[str, Any], types_: dict[str, Any], sources: Sources, prefix: str = "") -> list[str]:
    """One message per key of `values` whose value is not of its type in
    `types_` (a dataclass's type hints): the file or flag, the key, the
    expected type and the value."""
    return [f"{sources(prefix + key)}: {prefix}{key}: expected {_describe(types_[key])}, got {_show(value)}"
            for key, value in values.items() if key in types_ and not _matches(value, types_[key])]


def train_config_errors(values: dict[str, Any], sources: Sources | None = None) -> list[str]:
    """Unknown keys and wrongly typed values of TrainConfig (and its [model]
    table of ModelArgs fields), one message each."""
    sources = sources or Sources()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    errors = [f"{sources(unknown[0])}: TrainConfig: unknown key(s) {', '.join(map(repr, unknown))}; known: "
              f"{sorted(known)}"] if unknown else []
    errors += type_errors(values, typing.get_type_hints(TrainConfig), sources)
    if isinstance(values.get("model"), dict):
        errors += type_errors(values["model"], typing.get_type_hints(ModelArgs), sources, "model.")
    return errors


def config_from_dict(values: dict[str, Any], sources: Sources | None = None) -> TrainConfig:
    """TrainConfig from a dict shaped like the TOML file; unknown keys, wrong
    types and values out of range raise ConfigError (one line each)."""
    errors = train_config_errors(values, sources)
    if errors:
        raise ConfigError("\n".join(errors))
    cfg = TrainConfig(**values)
    try:
        cfg.model_args()  # ModelArgs' own checks (head counts, window), before anything runs
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def apply_overrides(values: dict[str, Any], overrides: Sequence[str], tables: Sequence[str] = ("model",)
                    ) -> dict[str, str]:
    """Apply `key=value` overrides to a TOML-shaped dict in place;
    `<table>.<key>=` sets a key of one of `tables` (sub-dicts of values).
    Returns {dotted key: the override that set it}."""
    set_by = {}
    for table in tables:
        values[table] = dict(values.get(table, {}))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        table, dot, sub = key.partition(".")
        if dot and table in tables:
            values[table][sub] = _parse_value(text.strip())
        else:
            values[key] = _parse_value(text.strip())
        set_by[key] = f"--set {item}"
    return set_by


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a TOML file (optional) and `key=value` overrides
    (`model.<field>=value` for ModelArgs fields), applied in order."""
    values, sources = load_settings(path, overrides, ("model",))
    return config_from_dict(values, sources)
