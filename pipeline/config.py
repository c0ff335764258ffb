"""The run config: typed, from a preset plus `key=value` overrides, validated before any process starts.

The preset fixes the paper's numbers (`model.presets`); an override changes
one of them and is recorded as such. The DeepSpeed JSON is generated from
the config; a user's own DeepSpeed JSON may be merged over it.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")
_BUCKET = 5_000_000  # elements per ZeRO communication bucket


class ConfigError(ValueError):
    """A run config that cannot run; raised before any process group or data is touched."""


@dataclass(frozen=True)
class RunConfig:
    preset: str
    data: str
    """The prepared dataset: `s3://bucket/prefix` or a folder holding `train/` and `valid/` (`vdvae prep --out`)."""
    run_dir: str
    # -- the paper's optimisation (preset values unless overridden) --
    batch_per_gpu: int = 0
    lr: float = 0.0
    grad_clip: float = 0.0
    skip_threshold: float = 0.0
    ema_rate: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.0
    adam_beta2: float = 0.0
    warmup_iters: int = -1
    # -- how this run executes --
    grad_accum: int = 1
    zero_stage: int = 2
    precision: str = "fp32"
    activation_checkpointing: str = "none"
    """`none`, `all`, or a resolution (e.g. `256`): blocks at and above it are recomputed."""
    seed: int = 0
    workers: int = 2
    max_steps: int = 0
    """0: train until stopped."""
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 10000
    sample_every: int = 10000
    checkpoint_mirror: str = ""
    """Optional `s3://...` where checkpoints are mirrored and resumed from."""
    deepspeed_json: str = ""
    """Optional DeepSpeed JSON merged over the generated one."""
    model_json: str = ""
    """Optional JSON of model settings (`ModelConfig` fields) over the preset's: a custom architecture."""
    overrides: tuple[str, ...] = field(default=())
    """The `key=value` strings this config was made with, as given."""

    @classmethod
    def from_preset(cls, preset: str, data: str, run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> "RunConfig":
        from model import get_preset  # (torch: only when a config is made, not for `vdvae --help`)

        p = get_preset(preset).training
        config = cls(preset, data, run_dir, batch_per_gpu=p.batch_per_gpu, lr=p.lr, grad_clip=p.grad_clip,
                     skip_threshold=p.skip_threshold, ema_rate=p.ema_rate, weight_decay=p.weight_decay,
                     adam_beta1=p.adam_betas[0], adam_beta2=p.adam_betas[1], warmup_iters=p.warmup_iters)
        return config.override(overrides)

    def override(self, overrides) -> "RunConfig":
        types = typing.get_type_hints(RunConfig)
        settable = set(SETTINGS)
        changes = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=1e-4")
            if key not in settable:
                near = difflib.get_close_matches(key, sorted(settable), n=3)
                raise ConfigError(f"unknown setting {key!r}" + (f"; did you mean {', '.join(near)}?" if near else
                                                                 f"; settings: {', '.join(sorted(settable))}"))
            changes[key] = _parse(key, value.strip(), types[key])
        config = replace(self, **changes, overrides=tuple(self.overrides) + tuple(overrides))
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            (self.batch_per_gpu > 0, "batch_per_gpu must be positive"),
            (self.lr > 0, "lr must be positive"),
            (self.grad_clip > 0, "grad_clip must be positive"),
            (self.skip_threshold > 0, "skip_threshold must be positive (the paper skips updates whose "
                                      "gradient norm is not below it)"),
            (0 <= self.ema_rate < 1, "ema_rate must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam betas must be in [0, 1)"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.zero_stage > 0 or self.precision == "fp32", "bf16 and fp16 need zero_stage 1, 2 or 3 "
                                                             "(stage 0 supports fp32 only)"),
            (self.activation_checkpointing in ("none", "all") or self.activation_checkpointing.isdigit(),
             "activation_checkpointing must be none, all, or a resolution such as 256"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.max_steps >= 0, "max_steps must be >= 0 (0: until stopped)"),
            (min(self.log_every, self.checkpoint_every, self.eval_every, self.sample_every) > 0,
             "log_every, checkpoint_every, eval_every and sample_every must be positive"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (not self.checkpoint_mirror or self.checkpoint_mirror.startswith("s3://"),
             "checkpoint_mirror must be an s3:// URL"),
        ]
        problems = [message for ok, message in checks if not ok]
        if self.deepspeed_json and not Path(self.deepspeed_json).is_file():
            problems.append(f"deepspeed_json {self.deepspeed_json} does not exist")
        if self.model_json:
            try:
                self.model_config()
            except (OSError, ValueError, TypeError) as err:
                problems.append(f"model_json {self.model_json}: {err}")
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))

    def model_config(self):
        """The preset's model, with `model_json`'s settings over it."""
        from model import get_preset

        model = get_preset(self.preset).model
        if not self.model_json:
            return model
        return replace(model, **json.loads(Path(self.model_json).read_text()))

    def deepspeed_config(self, world_size: int, on_gpu: bool) -> dict:
        """The DeepSpeed JSON. The lr schedule is the trainer's (the paper's update rule skips steps
        yet advances the schedule), so it is absent here."""
        ds = {
            "train_micro_batch_size_per_gpu": self.batch_per_gpu,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.batch_per_gpu * self.grad_accum * world_size,
            # under ZeRO DeepSpeed clips (the same formula as clip_grad_norm_); at stage 0 the update rule does
            "gradient_clipping": self.grad_clip if self.zero_stage > 0 else 0.0,
            "zero_optimization": {"stage": self.zero_stage},
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.lr, "betas": [self.adam_beta1, self.adam_beta2], "eps": 1e-8,
                "weight_decay": self.weight_decay, "torch_adam": not on_gpu}},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.zero_stage > 0:
            # DeepSpeed's default buckets (5e8 elements, 2 GB in fp32) are larger than these whole models
            ds["zero_optimization"].update(reduce_bucket_size=_BUCKET, allgather_bucket_size=_BUCKET)
        if self.zero_stage == 3:
            ds["zero_optimization"].update(stage3_param_persistence_threshold=0,  # partition every parameter
                                           stage3_prefetch_bucket_size=_BUCKET)
        if self.deepspeed_json:
            ds = _merge(ds, json.loads(Path(self.deepspeed_json).read_text()))
        return ds

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"saved config has unknown settings {sorted(unknown)}: made by another version?")
        data["overrides"] = tuple(data.get("overrides", ()))
        config = cls(**data)
        config.validate()
        return config


SETTINGS = tuple(f.name for f in fields(RunConfig) if f.name not in ("preset", "data", "run_dir", "overrides"))
"""What `key=value` may set."""


def _parse(key: str, value: str, kind) -> object:
    try:
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return value
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected {getattr(kind, '__name__', kind)}") from None


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def check_data(config: RunConfig) -> dict[str, int]:
    """Read the train and valid manifests and check they fit the preset; samples per split.

    Fails before any process group starts when the data is missing or was
    prepared for another resolution or bit depth.
    """
    from .stream import Split

    model = config.model_config()
    counts = {}
    for split in ("train", "valid"):
        manifest = Split.load(f"{config.data.rstrip('/')}/{split}")
        if manifest.resolution != model.image_size:
            raise ConfigError(f"{manifest.url} holds {manifest.resolution} px images; preset {config.preset} "
                              f"trains on {model.image_size} px (a custom model: model_json=FILE)")
        if manifest.bits != model.bits:
            raise ConfigError(f"{manifest.url} was prepared as {manifest.bits}-bit data ({manifest.dataset}); "
                              f"preset {config.preset} models {model.bits}-bit data")
        counts[split] = manifest.num_samples
    return counts
