"""The run config: typed, from a preset plus `key=value` overrides, validated before any process starts.

The preset fixes the paper's numbers (`model.presets.PaperTraining`, their
one declaration); a run config field left unset takes the preset's value,
and an override changes it and is recorded as such. Single-field checks
run when a config is made (`__post_init__`); everything that needs the
data, the world size or the run folder is `validate_run`, called once,
before any process group. The DeepSpeed JSON is generated from the config;
a user's own DeepSpeed JSON may be merged over it, but not contradict it.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from data_prep.shards import ManifestError, Split, read_json
from model import ModelConfig, get_preset

from .init import check_start

PRECISIONS = ("fp32", "bf16", "fp16")
_BUCKET = 5_000_000  # elements per ZeRO communication bucket
_PAPER = {"batch_per_gpu": "batch_per_gpu", "lr": "lr", "grad_clip": "grad_clip",
          "skip_threshold": "skip_threshold", "ema_rate": "ema_rate", "weight_decay": "weight_decay",
          "warmup_iters": "warmup_iters"}
"""Run config field -> the preset's PaperTraining field it defaults to (the betas are split below)."""
RUN_FOLDER_FIXED = ("preset", "data", "model_json", "seed", "zero_stage")
"""What a run folder's saved config must share with a config that resumes it (the ranks, the batch per
rank and the accumulation may change: the data stream's position is world-free)."""


class ConfigError(ValueError):
    """A run config that cannot run; raised before any process group or data is touched."""


@dataclass(frozen=True)
class RunConfig:
    preset: str
    data: str
    """The prepared dataset: `s3://bucket/prefix` or a folder holding `train/` and `valid/` (`vdvae prep --out`)."""
    run_dir: str
    # -- the paper's optimisation: None takes the preset's value --
    batch_per_gpu: int | None = None
    lr: float | None = None
    grad_clip: float | None = None
    skip_threshold: float | None = None
    """Updates whose pre-clip gradient norm is not below this are skipped (the paper's rule)."""
    ema_rate: float | None = None
    weight_decay: float | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    warmup_iters: int | None = None
    # -- how this run executes --
    grad_accum: int = 1
    zero_stage: int = 2
    precision: str = "fp32"
    activation_checkpointing: str = "none"
    """`none`, `all`, or a resolution (e.g. `256`): blocks at and above it are recomputed."""
    compile: bool = False
    """`torch.compile` the model's blocks (inductor); ZeRO stages 0-2. The first steps take longer."""
    collective_timeout_s: int = 1800
    """A collective that waits longer than this ends the job (NCCL's async error handling) instead of
    holding the allocation; long enough for an evaluation or a checkpoint on another rank."""
    seed: int = 0
    workers: int = 2
    max_steps: int = 0
    """0: train until stopped."""
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 10000
    sample_every: int = 10000
    max_consecutive_skips: int = 100
    """Stop (after a checkpoint, with a status that is not requeued) once this many updates in a row were
    skipped; 0: never. Skips are isolated in a healthy run (a few per thousand steps in the official
    runs); 100 in a row means the gradient norms now sit above skip_threshold and nothing is learnt."""
    checkpoint_mirror: str = ""
    """Optional `s3://...` where checkpoints are mirrored (in the background) and resumed from."""
    mirror_wait_s: int = 240
    """At the end of a job (done, or a signal's checkpoint), how long to wait for the mirror's pending
    upload; keep it under the batch script's --signal-grace."""
    deepspeed_json: str = ""
    """Optional DeepSpeed JSON merged over the generated one; it may add settings, not contradict ours."""
    model_json: str = ""
    """Optional JSON of model settings (`ModelConfig` fields) over the preset's: a custom architecture."""
    init: str = ""
    """Start a new run from weights: one of our weights files, an exported run's folder (`vdvae export`),
    or an official `*-model.th`; fresh optimizer, step 0, the preset's warmup (`pipeline/init.py`). A
    run folder with a checkpoint resumes from that instead."""
    init_ema: str = ""
    """With `init`: the EMA's starting weights (the same kinds of file); default: equal to the weights."""
    init_official: str = ""
    """Continue an official run: PREFIX of its PREFIX-model.th, -model-ema.th, -opt.th and -log.jsonl
    (weights, EMA, Adam moments and step counts, and the iteration from the log)."""
    overrides: tuple[str, ...] = field(default=())
    """The `key=value` strings this config was made with, as given."""

    def __post_init__(self) -> None:
        try:
            paper = get_preset(self.preset).training
        except (KeyError, ValueError) as err:
            raise ConfigError(str(err).strip("'\"")) from None
        defaults = {ours: getattr(paper, theirs) for ours, theirs in _PAPER.items()}
        defaults.update(adam_beta1=paper.adam_betas[0], adam_beta2=paper.adam_betas[1])
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        problems = self._problems()
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        numbers = {f.name: getattr(self, f.name) for f in fields(self)
                   if isinstance(getattr(self, f.name), float)}
        problems = [f"{name}={value} is not a finite number" for name, value in numbers.items()
                    if not math.isfinite(value)]
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
            (isinstance(self.compile, bool), "compile must be true or false"),
            (not self.compile or self.zero_stage < 3, "compile=true works at zero_stage 0, 1 or 2: ZeRO-3 "
                                                      "gathers each parameter in module hooks that a compiled "
                                                      "block does not run; use zero_stage=2 or compile=false"),
            (self.mirror_wait_s >= 0, "mirror_wait_s must be >= 0"),
            (self.collective_timeout_s >= 60, "collective_timeout_s must be at least 60"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.max_steps >= 0, "max_steps must be >= 0 (0: until stopped)"),
            (min(self.log_every, self.checkpoint_every, self.eval_every, self.sample_every) > 0,
             "log_every, checkpoint_every, eval_every and sample_every must be positive"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.max_consecutive_skips >= 0, "max_consecutive_skips must be >= 0 (0: never stop for skips)"),
            (not self.checkpoint_mirror or self.checkpoint_mirror.startswith("s3://"),
             "checkpoint_mirror must be an s3:// URL"),
            (not self.init_ema or self.init, "init_ema needs init (the weights it goes with)"),
            (not self.init_official or not (self.init or self.init_ema),
             "init_official brings its own weights and EMA: give it without init and init_ema"),
        ]
        problems += [message for ok, message in checks if not ok]
        if self.deepspeed_json:
            try:
                self.user_deepspeed_json()
            except ConfigError as err:
                problems.append(str(err))
        if self.model_json:
            try:
                self.model_config()
            except ConfigError as err:
                problems.append(str(err))
        return problems

    @classmethod
    def from_preset(cls, preset: str, data: str, run_dir: str,
                    overrides: list[str] | tuple[str, ...] = ()) -> "RunConfig":
        return cls(preset, data, run_dir).override(overrides)

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
        return replace(self, **changes, overrides=tuple(self.overrides) + tuple(overrides))

    def model_config(self) -> ModelConfig:
        """The preset's model, with `model_json`'s settings over it."""
        model = get_preset(self.preset).model
        if not self.model_json:
            return model
        path = Path(self.model_json)
        try:
            settings = read_json(path.read_bytes(), f"model_json {path}")
        except OSError as err:
            raise ConfigError(f"model_json {path}: {err.strerror}") from None
        except ManifestError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(settings, dict):
            raise ConfigError(f"model_json {path}: expected an object of ModelConfig settings")
        try:
            return replace(model, **settings)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model_json {path}: {err}") from None

    def user_deepspeed_json(self) -> dict:
        """The user's DeepSpeed JSON, read and checked against this config: it may add settings, and
        may repeat ours with the same value, but a different value is an error naming both."""
        if not self.deepspeed_json:
            return {}
        path = Path(self.deepspeed_json)
        if not path.is_file():
            raise ConfigError(f"deepspeed_json {path} does not exist")
        try:
            extra = read_json(path.read_bytes(), f"deepspeed_json {path}")
        except ManifestError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(extra, dict):
            raise ConfigError(f"deepspeed_json {path}: expected a JSON object")
        if "scheduler" in extra:
            raise ConfigError(f"deepspeed_json {path} sets a scheduler: the lr schedule is the run's (the "
                              "paper's warmup, advancing on skipped updates too); set lr= and warmup_iters=")
        ours = self._generated_deepspeed(world_size=None, on_gpu=False)
        clashes = [f"{key}={theirs!r} (the run's {setting} gives {mine!r})"
                   for key, setting, mine, theirs in _contradictions(ours, extra, _DEEPSPEED_OWNERS)]
        if clashes:
            raise ConfigError(f"deepspeed_json {path} contradicts the run config: {'; '.join(clashes)}. Set "
                              "these through the run config (key=value) and remove them from the file")
        return extra

    def _generated_deepspeed(self, world_size: int | None, on_gpu: bool) -> dict:
        ds = {
            "train_micro_batch_size_per_gpu": self.batch_per_gpu,
            "gradient_accumulation_steps": self.grad_accum,
            # under ZeRO DeepSpeed clips (the same formula as clip_grad_norm_); at stage 0 the update rule does
            "gradient_clipping": self.grad_clip if self.zero_stage > 0 else 0.0,
            "zero_optimization": {"stage": self.zero_stage},
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.lr, "betas": [self.adam_beta1, self.adam_beta2], "eps": 1e-8,
                "weight_decay": self.weight_decay,
                # torch's AdamW (DeepSpeed's own FusedAdam is a CUDA extension JIT-built at the first
                # start on every node); fused on GPUs: one kernel over all parameters
                "torch_adam": True, "fused": on_gpu}},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if world_size is not None:
            ds["train_batch_size"] = self.batch_per_gpu * self.grad_accum * world_size
        if self.zero_stage > 0:
            # DeepSpeed's default buckets (5e8 elements, 2 GB in fp32) are larger than these whole models
            ds["zero_optimization"].update(reduce_bucket_size=_BUCKET, allgather_bucket_size=_BUCKET)
        if self.zero_stage == 3:
            ds["zero_optimization"].update(stage3_param_persistence_threshold=0,  # partition every parameter
                                           stage3_prefetch_bucket_size=_BUCKET)
        return ds

    def deepspeed_config(self, world_size: int, on_gpu: bool) -> dict:
        """The DeepSpeed JSON. The lr schedule is the trainer's (the paper's update rule skips steps
        yet advances the schedule), so it is absent here."""
        return _merge(self._generated_deepspeed(world_size, on_gpu), self.user_deepspeed_json())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "run config") -> "RunConfig":
        try:
            data = read_json(text, where)
        except ManifestError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object of run settings")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{where} has unknown settings {sorted(unknown)}: made by another version?")
        data["overrides"] = tuple(data.get("overrides", ()))
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None


SETTINGS = tuple(f.name for f in fields(RunConfig) if f.name not in ("preset", "data", "run_dir", "overrides"))
"""What `key=value` may set."""

_DEEPSPEED_OWNERS = {
    "train_micro_batch_size_per_gpu": "batch_per_gpu",
    "gradient_accumulation_steps": "grad_accum",
    "train_batch_size": "batch_per_gpu x grad_accum x ranks",
    "gradient_clipping": "grad_clip",
    "zero_optimization.stage": "zero_stage",
    "optimizer.type": "the paper's AdamW",
    "optimizer.params.lr": "lr",
    "optimizer.params.betas": "adam_beta1, adam_beta2",
    "optimizer.params.weight_decay": "weight_decay",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
}
"""DeepSpeed settings the run config decides, and the run setting that decides each."""


def _contradictions(ours: dict, theirs: dict, owners: dict[str, str]):
    """(key, run setting, our value, theirs) where `theirs` sets a key to another value than `ours`
    (train_batch_size, which needs the world size, is checked by `validate_run`)."""
    for key, setting in owners.items():
        mine, other = _lookup(ours, key), _lookup(theirs, key)
        if mine is not _MISSING and other is not _MISSING and _normal(mine) != _normal(other):
            yield key, setting, mine, other


_MISSING = object()


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _normal(value):
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)


def _parse(key: str, value: str, kind) -> object:
    base = [k for k in typing.get_args(kind) if k is not type(None)][0] if typing.get_args(kind) else kind
    try:
        if base is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if base is int:
            return int(value)
        if base is float:
            number = float(value)
        else:
            return value
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected {getattr(base, '__name__', base)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}={value}: expected a finite number")
    return number


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def check_data(config: RunConfig) -> dict[str, int]:
    """Read the train and valid manifests and check them against the preset; samples per split.

    Fails before any process group starts when the data is missing, was
    prepared for another resolution or bit depth, or lacks a shard its
    manifest lists.
    """
    model = config.model_config()
    counts = {}
    for split in ("train", "valid"):
        try:
            manifest = Split.load(f"{config.data.rstrip('/')}/{split}")
        except ManifestError as err:
            raise ConfigError(str(err)) from None
        if manifest.resolution != model.image_size:
            raise ConfigError(f"{manifest.url} holds {manifest.resolution} px images; preset {config.preset} "
                              f"trains on {model.image_size} px (a custom model: model_json=FILE)")
        if manifest.bits != model.bits:
            raise ConfigError(f"{manifest.url} was prepared as {manifest.bits}-bit data ({manifest.dataset}); "
                              f"preset {config.preset} models {model.bits}-bit data")
        missing = manifest.missing_shards()
        if missing:
            raise ConfigError(f"{manifest.url}: {len(missing)} shards its manifest lists are missing "
                              f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); run the prep "
                              "again to complete them, or `vdvae verify` to see the state of every shard")
        counts[split] = manifest.num_samples
    return counts


def batch_problem(config: RunConfig, counts: dict[str, int], world_size: int) -> str | None:
    """Why the training split cannot give each of `world_size` ranks one batch, or None."""
    if counts["train"] >= config.batch_per_gpu * world_size:
        return None
    return (f"{config.data}/train holds {counts['train']} samples, fewer than one batch of "
            f"{config.batch_per_gpu} for each of {world_size} ranks; lower batch_per_gpu or use fewer ranks")


def check_run_folder(config: RunConfig) -> RunConfig | None:
    """The run folder's saved config (None for a new folder), refused when it is another run."""
    path = Path(config.run_dir) / "config.json"
    if not path.exists():
        return None
    saved = RunConfig.from_json(path.read_bytes(), str(path))
    changed = [k for k in RUN_FOLDER_FIXED if getattr(saved, k) != getattr(config, k)]
    if changed:
        raise ConfigError(f"{config.run_dir} holds a run with other {', '.join(changed)}; "
                          "use a new --run-dir, or the same settings to resume it")
    return saved


def precision_warning(config: RunConfig, bf16_native: bool) -> str | None:
    """A warning for a run that will be slow but not wrong: bf16 on a machine that emulates it."""
    if config.precision == "bf16" and not bf16_native:
        return ("precision=bf16 on a machine without native bf16 (a CPU without AVX-512 BF16 or AMX, or a GPU "
                "older than Ampere): torch emulates it, and a step is several times slower than in fp32; "
                "use precision=fp32 here")
    return None


def validate_run(config: RunConfig, world_size: int, on_gpu: bool) -> dict[str, int]:
    """Everything that needs the data, the world size or the run folder, checked once before any
    process group starts (every rank runs it, so all fail alike and none waits); samples per split."""
    if config.precision == "fp16" and not on_gpu:
        raise ConfigError("precision=fp16 needs GPUs (DeepSpeed's CPU accelerator has no fp16); "
                          "use bf16 or fp32")
    ds = config.deepspeed_config(world_size, on_gpu)
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] \
            * world_size:
        raise ConfigError(f"DeepSpeed batch arithmetic: train_batch_size {ds['train_batch_size']} is not "
                          f"{ds['train_micro_batch_size_per_gpu']} x {ds['gradient_accumulation_steps']} x "
                          f"{world_size} ranks")
    check_run_folder(config)
    check_start(config)  # init=, init_ema=, init_official=: every file readable and of this model
    counts = check_data(config)
    problem = batch_problem(config, counts, world_size)
    if problem:
        raise ConfigError(problem)
    return counts
