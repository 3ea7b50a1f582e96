"""Typed configuration: YAML files over dataclass defaults, plus dotted ``key=value`` overrides.

A config has five sections, ``data``, ``model``, ``train``, ``infer`` and ``tracking``.
The dataclass defaults are the values of ``configs/default.yaml`` (a test keeps the two equal).
A YAML file may name a ``base`` file (relative to itself) that it overrides, so experiment
configs say only what differs from ``configs/default.yaml``::

    base: default.yaml
    train:
      epochs: 6

Overrides on the command line use dotted keys and YAML values: ``train.epochs=6``,
``model.bins=[1,2,3,6]``. An unknown key, a value of the wrong type or a value out of
range raises :class:`ConfigError` naming the key. YAML is always read with the safe loader.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "InferConfig",
    "TrackingConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flatten",
    "save_config",
]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class DataConfig:
    """Where cases come from and how volumes become training slices."""

    root: str | None = None  # dataset folder or datalist; None: the built-in synthetic set
    layout: Literal["auto", "brats2021", "brats2023", "msd"] = "auto"
    task: str = "auto"  # BraTS 2023+ task: auto (from each case id) or GLI, SSA, GoAT, MEN, MET, PED, MEN-RT
    cache_dir: str = ".cache/brats_psp"  # preprocessed cases (and the generated demo set)
    demo_cases: int = 50  # size of the built-in synthetic set
    demo_seed: int = 0
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])  # mm, (x, y, z) after resampling
    intensity_percentiles: list[float] | None = None  # [low, high]: clip each contrast's brain voxels before the z-score; null: no clip
    slice_size: list[int] = field(default_factory=lambda: [128, 128])  # training slice H x W (pad / crop)
    context_slices: int = 1  # 2.5D: k neighbours on each side, 4 * (2k + 1) input channels
    planes: list[str] = field(default_factory=lambda: ["axial"])  # slice directions for training
    tumour_ratio: float = 0.5  # fraction of sampled slices that contain tumour
    folds: int = 5
    fold: int = 0
    split_seed: int = 0
    augment: bool = True
    flip_prob: float = 0.5
    rotate_deg: float = 15.0
    scale_range: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma_range: list[float] = field(default_factory=lambda: [0.8, 1.25])
    noise_std: float = 0.05
    lesion_appearance: float = 0.5  # probability per slice of redrawing the lesion parts' intensities (0 = off)
    bias_field: float = 0.2  # largest amplitude (z-score units) of a smooth additive field per channel (0 = off)
    rerender: float = 0.0  # probability per slice of drawing new contrasts from the stored class map (built-in set; 0 = off)

    def validate(self) -> None:
        _check(len(self.spacing) == 3 and all(s > 0 for s in self.spacing), "data.spacing", self.spacing, "3 positive numbers (mm)")
        ip = self.intensity_percentiles
        _check(ip is None or (len(ip) == 2 and 0.0 <= ip[0] < ip[1] <= 100.0), "data.intensity_percentiles", ip, "null or [low, high] with 0 <= low < high <= 100")
        _check(len(self.slice_size) == 2 and all(s >= 16 for s in self.slice_size), "data.slice_size", self.slice_size, "2 integers >= 16")
        _check(self.context_slices >= 0, "data.context_slices", self.context_slices, ">= 0")
        _check(set(self.planes) <= {"axial", "coronal", "sagittal"} and len(self.planes) > 0, "data.planes", self.planes, "a subset of axial, coronal, sagittal")
        _check(0.0 <= self.tumour_ratio <= 1.0, "data.tumour_ratio", self.tumour_ratio, "in [0, 1]")
        _check(self.folds >= 2, "data.folds", self.folds, ">= 2")
        _check(0 <= self.fold < self.folds, "data.fold", self.fold, f"in [0, {self.folds - 1}]")
        _check(self.demo_cases >= 2, "data.demo_cases", self.demo_cases, ">= 2")
        _check(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", self.flip_prob, "in [0, 1]")
        _check(len(self.gamma_range) == 2 and 0 < self.gamma_range[0] <= self.gamma_range[1], "data.gamma_range", self.gamma_range, "[low, high] with 0 < low <= high")
        _check(0.0 <= self.lesion_appearance <= 1.0, "data.lesion_appearance", self.lesion_appearance, "in [0, 1]")
        _check(0.0 <= self.rerender <= 1.0, "data.rerender", self.rerender, "in [0, 1]")
        from brats_psp.labels import TASKS

        _check(self.task.lower() in {"auto", *(t.lower() for t in TASKS)}, "data.task", self.task, f"auto or one of {list(TASKS)}")
        for key in ("rotate_deg", "scale_range", "intensity_scale", "intensity_shift", "noise_std", "bias_field"):
            _check(getattr(self, key) >= 0, f"data.{key}", getattr(self, key), ">= 0")

    @property
    def in_channels(self) -> int:
        """Network input channels: 4 contrasts times (2k + 1) slices."""
        return 4 * (2 * self.context_slices + 1)


@dataclass
class ModelConfig:
    """The network: the one schema of its settings (defaults, types, limits), read by
    :func:`brats_psp.networks.build_network`.

    ``depth`` is one of the dilated ResNet's depths (``networks.resnet.RESNET_DEPTHS``); the
    widths are positive integers and ``dropout`` lies in [0, 1): the limits the network
    modules check again when built directly. ``seed_pspnet`` fixes its own head and ignores
    ``psp_channels``, ``decoder``, ``class_head``, ``deep_supervision``, ``dropout`` and
    ``decoder_channels``.
    """

    name: Literal["pspnet", "seed_pspnet"] = "pspnet"
    depth: Literal[18, 34, 50, 101] = 18
    width: int = 16  # base channels of the ResNet (64 in the paper)
    bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    psp_channels: int = 128
    decoder: Literal["progressive", "skip", "bilinear"] = "skip"
    output: Literal["sigmoid", "softmax"] = "sigmoid"
    class_head: bool = True
    deep_supervision: bool = True  # the PSPNet auxiliary head on layer 3 (training only)
    dropout: float = 0.1
    decoder_channels: list[int] | None = None  # progressive decoder widths; None: derived from psp_channels

    def validate(self) -> None:
        dec = self.decoder_channels
        _check(dec is None or (len(dec) == 3 and all(c >= 1 for c in dec)), "model.decoder_channels", dec, "null or 3 positive integers")
        _check(self.width >= 1, "model.width", self.width, "a positive integer")
        _check(len(self.bins) > 0 and all(b >= 1 for b in self.bins), "model.bins", self.bins, "positive integers")
        _check(self.psp_channels >= 1, "model.psp_channels", self.psp_channels, "a positive integer")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "in [0, 1)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """A checked ``ModelConfig`` from a mapping of ``model`` keys (absent keys: the defaults).

        Raises:
            ConfigError: an unknown key, a wrong type or a value out of range, naming the key.
        """
        config = Config()
        _apply(config, {"model": dict(values)}, "model config")
        config.model.validate()
        return config.model


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and the hardware to use."""

    epochs: int = 20
    slices_per_epoch: int = 2600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    schedule: Literal["poly", "cosine"] = "poly"
    poly_power: float = 0.9
    warmup_epochs: int = 0
    grad_clip: float = 12.0  # max gradient norm; 0 disables
    alpha: float = 1.0  # weight of the class-head BCE
    aux_weight: float = 0.4  # weight of the deep-supervision term
    val_every: int = 2  # epochs between validations on whole volumes
    val_tta: bool = False  # flip TTA in those validations (4 passes); calibration after training always uses infer.tta
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int = 0  # torch intra-op threads; 0: all cores
    num_workers: int = -1  # data-loader processes; -1: auto (see brats_psp.training.loader_workers)
    output_dir: str = "outputs"
    calibrate_threshold: bool = True  # after training: per-region thresholds that maximise validation Dice -> infer.region_thresholds
    ema_decay: float = 0.0  # > 0: validate, checkpoint and infer with a moving average of the weights (brats_psp.averaging); 0 disables

    def validate(self) -> None:
        for key in ("epochs", "slices_per_epoch", "batch_size", "val_every"):
            _check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        for key in ("weight_decay", "grad_clip", "alpha", "aux_weight", "threads", "warmup_epochs"):
            _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), ">= 0")
        _check(self.num_workers >= -1, "train.num_workers", self.num_workers, ">= 0, or -1 for auto")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "in [0, 1)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1) (0 disables)")


@dataclass
class InferConfig:
    """Whole-volume inference: windows over slices, test-time augmentation, postprocessing."""

    batch_size: int = 32  # slices per forward pass
    roi_size: list[int] = field(default_factory=lambda: [128, 128])  # in-plane window (H, W)
    overlap: float = 0.25
    blend: Literal["constant", "gaussian"] = "gaussian"
    tta: bool = True  # flip test-time augmentation
    scales: list[float] = field(default_factory=lambda: [1.0])  # in-plane zoom factors averaged at test time (PSPNet's multi-scale testing)
    planes: list[str] = field(default_factory=lambda: ["axial"])
    threshold: float = 0.5
    region_thresholds: list[float] | None = None  # WT, TC, ET; set by train.calibrate_threshold; null: threshold for all
    hysteresis: float | list[float] = 0.5  # a region also keeps the voxels above hysteresis x its threshold connected to it (inference.hysteresis_masks); 0 = off; or 3 values, WT, TC, ET
    class_gate: float = 0.0  # > 0: a region is removed from every slice whose class-head probability for it is below this (inference.RegionProbabilities); 0 = off
    small_et_voxels: int = 500  # ET below this many voxels becomes NCR (BraTS postprocessing); 0 disables
    min_component_voxels: int = 0  # drop connected components smaller than this; 0 disables
    min_component_fraction: float = 0.2  # drop tumour components smaller than this fraction of the largest (0.1 before 2026-12-06: README); 0 disables
    core_component_fraction: float = 0.1  # core (TC) components smaller than this fraction of the largest core component become edema; 0 disables
    core_neck_mm: float = 0.0  # > 0: core parts joined to the rest only through a neck narrower than 2 x this (mm) count as components of their own for core_component_fraction (segment.necked_components); 0 = off
    fill_core: bool = True  # tumour that the core (NCR + ET) encloses in a slice becomes NCR (segment.fill_core)
    rim_hull: bool = True  # edema inside the convex hull of an enhancing component in a slice becomes NCR (segment.fill_rim_hull)
    labels: Literal["input", "brats2021", "brats2023", "brats2023-ped", "msd"] = "input"
    save_probabilities: bool = False

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The probability above which a voxel is in each region (WT, TC, ET)."""
        return tuple(self.region_thresholds) if self.region_thresholds else (self.threshold,) * 3

    @property
    def hysteresis_factors(self) -> tuple[float, ...]:
        """``hysteresis`` per region (WT, TC, ET): one value for all, or the three given."""
        h = self.hysteresis
        return tuple(float(f) for f in h) if isinstance(h, (list, tuple)) else (float(h),) * 3

    @property
    def low_thresholds(self) -> tuple[float, ...] | None:
        """Hysteresis thresholding's low thresholds per region (its ``hysteresis`` factor x its
        threshold; a region whose factor is 0 keeps its threshold, i.e. does not grow); None
        when every factor is 0."""
        factors = self.hysteresis_factors
        if not any(f > 0 for f in factors):
            return None
        return tuple(round(f * t, 6) if f > 0 else t for f, t in zip(factors, self.thresholds))

    def validate(self) -> None:
        _check(self.batch_size >= 1, "infer.batch_size", self.batch_size, ">= 1")
        _check(len(self.roi_size) == 2 and all(s >= 16 for s in self.roi_size), "infer.roi_size", self.roi_size, "2 integers >= 16")
        _check(0.0 <= self.overlap < 1.0, "infer.overlap", self.overlap, "in [0, 1)")
        _check(0.0 < self.threshold < 1.0, "infer.threshold", self.threshold, "in (0, 1)")
        rt = self.region_thresholds
        _check(rt is None or (len(rt) == 3 and all(0.0 < t < 1.0 for t in rt)), "infer.region_thresholds", rt, "null or 3 values in (0, 1): WT, TC, ET")
        _check(set(self.planes) <= {"axial", "coronal", "sagittal"} and len(self.planes) > 0, "infer.planes", self.planes, "a subset of axial, coronal, sagittal")
        _check(len(self.scales) > 0 and all(0.25 <= float(f) <= 4.0 for f in self.scales), "infer.scales", self.scales, "one or more zoom factors in [0.25, 4]")
        h = self.hysteresis
        _check(
            (len(h) == 3 if isinstance(h, (list, tuple)) else True) and all(0.0 <= f < 1.0 for f in self.hysteresis_factors),
            "infer.hysteresis", h, "in [0, 1) (the low threshold as a fraction of each region's), or 3 such values: WT, TC, ET",
        )
        _check(0.0 <= self.class_gate < 1.0, "infer.class_gate", self.class_gate, "in [0, 1): 0 = off")
        _check(self.small_et_voxels >= 0, "infer.small_et_voxels", self.small_et_voxels, ">= 0")
        _check(self.min_component_voxels >= 0, "infer.min_component_voxels", self.min_component_voxels, ">= 0")
        _check(0.0 <= self.min_component_fraction < 1.0, "infer.min_component_fraction", self.min_component_fraction, "in [0, 1)")
        _check(0.0 <= self.core_component_fraction < 1.0, "infer.core_component_fraction", self.core_component_fraction, "in [0, 1)")
        _check(0.0 <= self.core_neck_mm <= 20.0, "infer.core_neck_mm", self.core_neck_mm, "in [0, 20] mm: 0 = off")


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what is logged."""

    enabled: bool = True  # false: no MLflow at all (the run folder is outputs/offline-<time>)
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    experiment: str = "brats_psp"
    run_name: str | None = None
    log_model: bool = True
    register_name: str | None = None
    system_metrics: bool = False  # MLflow's CPU/GPU/memory logging (needs psutil: pip install -e .[system])


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            check = getattr(getattr(self, section.name), "validate", None)
            if check is not None:
                check()
        return self


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range (expected {expected})")


# --------------------------------------------------------------------------- type checking


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` as type ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: {value!r} is not allowed")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {hint!r} for {key}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


def _section_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(config: Config, values: Mapping[str, Any], source: str) -> None:
    """Set each ``section.key`` of ``values`` (nested mapping) on ``config`` with type checks."""
    sections = {f.name: f for f in dataclasses.fields(config)}
    for section, body in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; expected one of {sorted(sections)}")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(body).__name__}")
        target = getattr(config, section)
        hints = _section_hints(type(target))
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section}.{key}; known keys: {sorted(hints)}")
            setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The chain of mappings from the deepest ``base`` to ``path``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        body = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(body).__name__}")
    chain: list[tuple[dict[str, Any], str]] = []
    base = body.pop("base", None)
    if base is not None:
        chain = _read_yaml(path.parent / str(base), (*seen, path))
    return [*chain, (body, str(path))]


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=3e-4"`` -> ``("train", "lr", 3e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must be section.key (e.g. train.epochs)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML: {err}") from None
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config: dataclass defaults, then the YAML chain of ``path``, then ``overrides``.

    Raises:
        ConfigError: unknown key, wrong type, out-of-range value or missing file; the
            message names the key (and the file).
    """
    config = Config()
    if path is not None:
        for body, source in _read_yaml(Path(path)):
            _apply(config, body, source)
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Apply dotted ``section.key=value`` overrides to ``config`` (in place) and validate it."""
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(config, {section: {key: value}}, f"override {text!r}")
    return config.validate()


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Rebuild a config saved with :func:`config_to_dict` (e.g. from a checkpoint)."""
    config = Config()
    _apply(config, values, "saved config")
    return config.validate()


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML / JSON serialisable)."""
    return dataclasses.asdict(config)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_config(config: Config, path: str | Path) -> None:
    """Atomically write the resolved config as YAML."""
    from brats_psp.io import write_text

    write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
