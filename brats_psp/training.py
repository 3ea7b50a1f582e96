"""The training stage: PSPNet on axial slices, validated on whole volumes, tracked in MLflow.

:func:`train` is the whole stage as a Python API; ``python pipelines/run.py train`` calls it.
One epoch draws ``train.slices_per_epoch`` slices with :class:`TumourRatioSampler`, augmented in
batches on the device (:class:`~brats_psp.data.augment.BatchAugment`); every
``train.val_every`` epochs (and after the last) the model segments the validation volumes with
:func:`brats_psp.inference.predict_volume`, the code the infer stage uses, and reports Dice per
region. Each epoch ends with an atomic ``last.pt`` (and ``best.pt`` when validation improved);
``resume`` continues from ``last.pt`` into the same MLflow run. Every random draw of an epoch is
seeded from (``train.seed``, epoch), so a resumed run goes on exactly as an uninterrupted one.

Started by ``torchrun``, each process trains on its shard of the slices (DDP, gloo on CPU and
NCCL on GPU); metrics are averaged across processes and rank 0 alone writes checkpoints and
talks to MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from brats_psp.averaging import WeightEMA
from brats_psp.checkpoint import build_model_from_checkpoint, config_of, load_checkpoint, resolve_checkpoint, save_checkpoint
from brats_psp.config import Config, ConfigError, apply_overrides, config_to_dict, save_config
from brats_psp.cpus import available_cores
from brats_psp.data.builtin import ensure_training_cache, resolve_data_source
from brats_psp.data.augment import BatchAugment, batch_seed
from brats_psp.data.cache import CachedVolume, load_entry_meta, read_summary, split_cases
from brats_psp.data.slices import SliceDataset, TumourRatioSampler, slice_transforms
from brats_psp.data.transforms import preprocessing_params
from brats_psp.inference import RegionProbabilities, above_threshold, predict_volume
from brats_psp.io import remove_stale_temporaries, write_json
from brats_psp.labels import REGION_NAMES, tissue_to_regions
from brats_psp.losses import LossTerms, PSPLoss
from brats_psp.metrics import dice
from brats_psp.networks import build_network, count_parameters
from brats_psp.runtime import Runtime, autocast, rng_state, seed_everything, set_rng_state, setup_runtime, shutdown
from brats_psp.tracking import NullTracker, RunTracker, case_set, clear_running, git_commit, make_tracker, mark_running, resolve_tracking_uri

__all__ = [
    "TrainResult",
    "TrainingData",
    "TrainingRun",
    "Trainer",
    "train",
    "load_resume_state",
    "prepare_data",
    "start_run",
    "run_epoch",
    "finish_run",
    "train_step",
    "validate",
    "build_optimizer",
    "build_scheduler",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    run_id: str | None
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- building blocks


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum); no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step poly (power ``train.poly_power``, as PSPNet) or cosine decay after a linear warm-up."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = cfg.train.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.train.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** cfg.train.poly_power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _sum_over_ranks(values: np.ndarray, runtime: Runtime) -> np.ndarray:
    """``values`` added element-wise over the processes, float64 (as they are with one process)."""
    values = np.asarray(values, dtype=np.float64)
    if not runtime.distributed:
        return values
    t = torch.tensor(values, device=runtime.device)  # a copy: the caller's array stays as it was
    dist.all_reduce(t)
    return t.cpu().numpy()


def _reduce_mean(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    if not runtime.distributed:
        return values
    keys = sorted(values)
    sums = _sum_over_ranks(np.array([values[k] for k in keys]), runtime)
    return {k: float(v) / runtime.world_size for k, v in zip(keys, sums)}


def _broadcast(obj: Any, runtime: Runtime) -> Any:
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- validation


def _segment_cached(
    model: nn.Module, case_dirs: list[Path], cfg: Config, runtime: Runtime, desc: str, progress: bool
) -> Iterator[tuple[CachedVolume, torch.Tensor, np.ndarray, torch.Tensor]]:
    """This process's share of the cached cases (every ``world_size``-th from its rank; all of
    them with one process), each segmented as ``infer`` would (preprocessed space): (volume,
    image (4, X, Y, Z), tissue (X, Y, Z), region probabilities (3, X, Y, Z))."""
    model.eval()
    mine = case_dirs[runtime.rank :: runtime.world_size]
    for case_dir in tqdm(mine, desc=desc, unit="case", leave=False, disable=not progress):
        vol = CachedVolume(case_dir)
        image = torch.from_numpy(np.asarray(vol.image, dtype=np.float32)).permute(1, 2, 3, 0)  # (4, X, Y, Z)
        tissue = np.asarray(vol.label).transpose(1, 2, 0)  # (X, Y, Z)
        yield vol, image, tissue, predict_volume(_unwrap(model), image, cfg.infer, runtime, cfg.model.output, cfg.data.context_slices)


def validate(
    model: nn.Module, case_dirs: list[Path], cfg: Config, runtime: Runtime, progress: bool = False
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Mean Dice per region over whole validation volumes (preprocessed space).

    Each process scores its share of the cases; the result is the mean over all of them.
    Flip TTA only with ``train.val_tta`` (and ``infer.tta``): the checkpoint is chosen on plain
    passes, a quarter of the cost. Returns the metrics and, on rank 0, the first case's arrays
    for the overlay figure.
    """
    cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, tta=cfg.infer.tta and cfg.train.val_tta))
    scores: list[list[float]] = []
    example = None
    for vol, image, tissue, probs in _segment_cached(model, case_dirs, cfg, runtime, "validate", progress):
        pred = above_threshold(probs, cfg.infer.thresholds).numpy()
        ref = tissue_to_regions(tissue)
        scores.append([dice(pred[i], ref[i]) for i in range(len(REGION_NAMES))])
        if example is None and runtime.is_main:
            example = {"case_id": vol.case_id, "image": image.numpy(), "tissue": tissue, "pred": pred}
    sums = np.asarray(scores, dtype=np.float64).reshape(-1, len(REGION_NAMES)).sum(axis=0)
    totals = _sum_over_ranks(np.append(sums, len(scores)), runtime)  # Dice sums and case count of all processes
    mean = (totals[:-1] / max(1.0, totals[-1])).tolist()
    metrics = {f"val/dice_{r}": m for r, m in zip(REGION_NAMES, mean)}
    metrics["val/dice_mean"] = float(np.mean(mean))
    return metrics, example


#: Thresholds tried by :func:`calibrate_thresholds`: 0.20 ... 0.70. Bounded below: with 0.10 ...
#: 0.70, run 17f6c052 took 0.10 for TC and ET, fit to its validation cases' generator, which cost
#: the older synthetic sets much more, and at 0.10-0.15 one false enhancing spot in a low-grade
#: validation case can decide ET. The floor was 0.30 until the four models of 2026-12-06 all
#: picked it for every region (their validation Dice still rising below it); at 0.20 the four
#: scored higher on four real gliomas (TC in 13 of 16 model x case pairs, ET in all 12 with
#: enhancing tumour) and a little lower on the synthetic sets (README, "More real scans").
CALIBRATION_GRID: tuple[float, ...] = tuple(round(0.2 + 0.05 * i, 2) for i in range(11))


def calibrate_thresholds(
    model: nn.Module, case_dirs: list[Path], cfg: Config, runtime: Runtime, grid: tuple[float, ...] = CALIBRATION_GRID, progress: bool = False
) -> tuple[list[float], dict[str, float]]:
    """Per region, the probability threshold of ``grid`` that maximises the mean Dice over the
    validation volumes (ties: the one nearest 0.5), and that Dice.

    A network trained with strong appearance augmentation tends to be unsure at the lesion's
    edge; on the held-out validation cases this picks the cut that its probabilities call for,
    instead of assuming 0.5. ET is scored as ``infer`` labels it, after the small-ET rule
    (``infer.small_et_voxels``, :func:`calibration_dice`). Under torchrun each process scores
    its share of the cases and the Dice sums are added over the processes, so every rank picks
    the same thresholds. Returns ``([WT, TC, ET] thresholds, {"WT": dice, ...})``.
    """
    small_et = cfg.infer.small_et_voxels / float(np.prod(cfg.data.spacing))  # the rule's 1 mm voxels, in cache voxels
    sums = np.zeros((len(REGION_NAMES), len(grid)))
    for _, _, tissue, probs in _segment_cached(model, case_dirs, cfg, runtime, "calibrate", progress):
        sums += calibration_dice(probs.cpu(), tissue_to_regions(tissue), grid, small_et)
    means = _sum_over_ranks(sums, runtime) / max(1, len(case_dirs))
    thresholds = pick_thresholds(grid, means)
    return thresholds, {name: float(means[r][grid.index(t)]) for r, (name, t) in enumerate(zip(REGION_NAMES, thresholds))}


def calibration_dice(probs: torch.Tensor, ref: np.ndarray, grid: tuple[float, ...], small_et: float = 0.0) -> np.ndarray:
    """Dice of one case per region (rows WT, TC, ET) at each threshold of ``grid``.

    ET as ``infer`` labels it: an enhancing prediction of fewer than ``small_et`` voxels in all
    counts as none (``infer.small_et_voxels`` makes it necrosis). Without this, one false
    enhancing speck in a validation case without enhancing tumour scores that case's ET 0 at
    every threshold low enough to draw it, although ``infer`` would never output it, and the
    calibration climbs to a threshold that cuts the true walls thinner (run f4f6750a: ET 0.40
    instead of 0.20, the Dice at 0.20-0.35 one case lower for a speck).
    """
    values = torch.tensor(grid, dtype=torch.float32).view(-1, 1, 1, 1)
    et = REGION_NAMES.index("ET")
    out = np.zeros((len(REGION_NAMES), len(grid)))
    for r in range(len(REGION_NAMES)):
        masks = (probs[r][None] > values).numpy()  # (T, X, Y, Z)
        for k, m in enumerate(masks):
            if r == et and 0 < int(m.sum()) < small_et:
                m = np.zeros_like(m)
            out[r, k] = dice(m, ref[r])
    return out


def pick_thresholds(grid: tuple[float, ...], means: np.ndarray) -> list[float]:
    """Per row of ``means`` (regions x ``grid``), the threshold of the highest mean Dice; among
    equal ones, the nearest to 0.5."""
    order = np.argsort(np.abs(np.asarray(grid) - 0.5), kind="stable")
    return [float(grid[int(order[np.argmax(row[order])])]) for row in np.asarray(means)]


def calibrate_best_checkpoint(run: TrainingRun, progress: bool = False) -> dict[str, Any] | None:
    """Calibrate the best checkpoint's thresholds on the validation cases and store them in its
    config (``infer.region_thresholds``), so that ``infer`` uses them; logged to the run.

    Every process calls it: rank 0 reads the checkpoint and sends its config and weights (not
    the optimizer's state) to the others, which may run on machines without its file; each
    scores its share of the cases, and rank 0 writes. Returns, on rank 0, the calibrated
    checkpoint as written, so that the caller need not read it again; None elsewhere and when
    there is nothing to calibrate (``train.calibrate_threshold`` off or no validation cases:
    the checkpoint is not read then).
    """
    cfg, is_main = run.cfg, run.runtime.is_main
    if not cfg.train.calibrate_threshold or not run.data.val_dirs:
        return None
    ckpt = load_checkpoint(run.best_path) if is_main else None
    sent = _broadcast({"config": ckpt["config"], "model": ckpt["model"]} if is_main else None, run.runtime)
    model = build_model_from_checkpoint(sent).to(run.runtime.device)
    thresholds, val = calibrate_thresholds(model, run.data.val_dirs, cfg, run.runtime, progress=progress)
    if not is_main:
        return None
    ckpt["config"]["infer"]["region_thresholds"] = thresholds
    save_checkpoint(run.best_path, ckpt)
    log.info(
        "calibrated thresholds on %d validation case(s): %s",
        len(run.data.val_dirs), ", ".join(f"{r} {t:.2f} (Dice {val[r]:.4f})" for r, t in zip(REGION_NAMES, thresholds)),
    )
    metrics = {f"calibration/threshold_{r}": t for r, t in zip(REGION_NAMES, thresholds)}
    metrics.update({f"calibration/val_dice_{r}": d for r, d in val.items()})
    metrics["calibration/val_dice_mean"] = float(np.mean(list(val.values())))
    run.tracker.log_metrics(metrics, step=cfg.train.epochs - 1)
    return ckpt


#: Overrides :func:`recalibrate` accepts: how ``infer`` labels (``infer.*``), where the data lives
#: and where the network runs; the rest is the model's own (its preprocessing, its split).
RECALIBRATE_KEYS = ("infer.", "data.root", "data.layout", "data.cache_dir", "train.device", "train.threads", "train.precision")


@dataclass
class Calibration:
    """What :func:`recalibrate` did."""

    checkpoint: Path  # the checkpoint written
    thresholds: list[float]  # WT, TC, ET
    dice: dict[str, float]  # each region's mean validation Dice at its threshold
    previous: list[float] | None  # the thresholds the model carried before
    val_cases: int


def recalibrate(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    data: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    tracking_uri: str | None = None,
    progress: bool = False,
) -> Calibration:
    """Calibrate a trained model's thresholds again, on the validation cases of its own split, as
    ``train`` does after its last epoch (:func:`calibrate_thresholds`).

    For a model trained before a change to the calibration or to ``infer`` (``infer.*``
    overrides: a class gate, say), whose stored thresholds no longer fit. The validation cases
    are those of the model's config (``data.fold`` of the cache of ``data`` / ``data.root``, or
    of the built-in synthetic set, generated and cached as ``train`` does when missing). The
    checkpoint is written with the new ``infer.region_thresholds`` and the overrides in its
    config, atomically, to ``output`` (default: over the checkpoint that was read).

    Raises:
        ConfigError: an override outside :data:`RECALIBRATE_KEYS`.
        CheckpointError: ``model`` does not resolve to a checkpoint.
    """
    refused = [o for o in overrides if not o.startswith(RECALIBRATE_KEYS)]
    if refused:
        raise ConfigError(f"calibrate takes only {', '.join(RECALIBRATE_KEYS)} overrides (the rest is the model's), got {refused}")
    path = resolve_checkpoint(model, "best", tracking_uri=tracking_uri)
    state = load_checkpoint(path)
    cfg = apply_overrides(config_of(state), list(overrides))
    previous = cfg.infer.region_thresholds
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    progress = progress and runtime.is_main
    out = Path(output or path)
    finished = False
    try:
        split = prepare_data(cfg, data, runtime, progress)
        network = build_model_from_checkpoint(state).to(runtime.device)
        thresholds, val = calibrate_thresholds(network, split.val_dirs, cfg, runtime, progress=progress)
        cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, region_thresholds=thresholds))
        state["config"] = config_to_dict(cfg)
        if runtime.is_main:  # under torchrun every rank has the same thresholds; one writes them
            save_checkpoint(out, state)
            log.info(
                "calibrated %s on %d validation case(s): %s (were %s); wrote %s",
                path, len(split.val_dirs), ", ".join(f"{r} {t:.2f} (Dice {val[r]:.4f})" for r, t in zip(REGION_NAMES, thresholds)), previous, out,
            )
        finished = True
    finally:
        shutdown(runtime, finished=finished)  # the others wait until rank 0 has written
    return Calibration(out, thresholds, val, previous, len(split.val_dirs))


# --------------------------------------------------------------------------- one epoch


def loader_workers(requested: int, runtime: Runtime) -> int:
    """Data-loader processes for ``train.num_workers`` (-1: auto).

    Auto is 0 on a CPU machine with at most 4 cores: there worker processes take cores from
    the training step's threads, and loading in the main process measured faster
    (``benchmarks/training.py`` on 2 cores: 43.3 slices/s against 35.9 with 2 workers). With
    a GPU, or more cores, it is up to 8, leaving cores for the main process.
    """
    if requested >= 0:
        return requested
    cores = available_cores()
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size)))
    if runtime.device.type == "cpu" and cores <= 4:
        return 0
    return max(0, min(8, cores - 2))


def build_train_loader(cfg: Config, train_dirs: list[Path], runtime: Runtime) -> DataLoader:
    """The training data path: cached volumes -> tumour-ratio sampler -> random crops -> batches
    (augmented on the device by :func:`augmented_batches`).

    Workers (``train.num_workers``, see :func:`loader_workers`) read while the main process
    trains, ``prefetch_factor`` batches ahead each; batches are pinned for a GPU.
    """
    workers = loader_workers(cfg.train.num_workers, runtime)
    dataset = SliceDataset(
        train_dirs, cfg.data.context_slices, slice_transforms(cfg.data, train=True), cfg.data.planes, compact=True,
        classes=cfg.data.augment and cfg.data.rerender > 0,
    )
    sampler = TumourRatioSampler(
        dataset.has_tumour, cfg.train.slices_per_epoch, cfg.data.tumour_ratio, cfg.train.seed, runtime.rank, runtime.world_size
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator(),
        pin_memory=runtime.device.type == "cuda",
        drop_last=True,
        prefetch_factor=4 if workers else None,
        # the sampler seeds every sample's random crop, so workers need no per-epoch seeds
        # and live across epochs instead of being forked again at each one
        persistent_workers=workers > 0,
    )


def seed_loader_epoch(loader: DataLoader, epoch: int, cfg: Config, runtime: Runtime) -> None:
    """Every random draw of an epoch (slices, augmentations, dropout) follows from (seed, epoch).

    The sampler's draw gives the slices and each one's crop seed, :func:`augmented_batches`
    seeds each batch's augmentations from (seed, epoch, step); the loader's generator and
    torch's seed cover the rest (worker base seeds, dropout).
    """
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    assert loader.generator is not None
    loader.generator.manual_seed(cfg.train.seed * 100_003 + epoch)
    torch.manual_seed(cfg.train.seed * 100_003 + epoch + runtime.rank)


#: The batch entries that travel compact (float16 images, uint8 masks) and are float32 on the device.
_FLOAT_KEYS = ("image", "label", "presence")


def to_device(batch: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """The batch's tensors on the runtime's device (asynchronous from pinned memory); image,
    masks and presence as float32 there, whatever dtype they travelled in."""
    out = {k: v.to(runtime.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for k in _FLOAT_KEYS:
        if k in out and out[k].dtype != torch.float32:
            out[k] = out[k].float()
    return out


def augmented_batches(loader: DataLoader, augment: BatchAugment, epoch: int, cfg: Config, runtime: Runtime) -> Iterator[dict[str, Any]]:
    """The loader's batches on the device, augmented there; batch ``i`` of ``epoch`` always
    draws the same augmentations (:func:`~brats_psp.data.augment.batch_seed`)."""
    for step, batch in enumerate(loader):
        yield augment(to_device(batch, runtime), batch_seed(cfg.train.seed, epoch, step, runtime.rank))


@dataclass
class Trainer:
    """What an optimisation step works on: the network, its optimiser, schedule and gradient
    scaler, the loss, and the settings."""

    model: nn.Module
    loss_fn: PSPLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    cfg: Config
    runtime: Runtime
    ema: WeightEMA | None = None  # the moving average of the weights (train.ema_decay > 0)

    @property
    def eval_model(self) -> nn.Module:
        """The network that validation and checkpoints' ``model`` use: the moving average of
        the weights when there is one, else the training network."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def build(cls, cfg: Config, runtime: Runtime, steps_per_epoch: int) -> Trainer:
        """A fresh network (channels-last, on the runtime's device) and everything around it."""
        model = build_network(cfg.model, cfg.data.in_channels).to(runtime.device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        return cls(
            model=model,
            loss_fn=PSPLoss(cfg.model.output, alpha=cfg.train.alpha, aux_weight=cfg.train.aux_weight),
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
            scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16),
            cfg=cfg,
            runtime=runtime,
            ema=WeightEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """``model`` is what inference loads (the averaged weights when there are some); with an
        average, ``train_model`` and ``ema_updates`` hold what resuming needs besides."""
        state = {
            "model": _unwrap(self.eval_model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.ema is not None:
            state["train_model"] = _unwrap(self.model).state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _unwrap(self.model).load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:
            self.ema.load_state_dict({"model": state["model"], "updates": state.get("ema_updates", 0)})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def train_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> LossTerms:
    """One optimisation step on one batch (channels-last, autocast, clipping, scheduler)."""
    t, cfg = trainer, trainer.cfg
    batch = to_device(batch, t.runtime)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    t.optimizer.zero_grad(set_to_none=True)
    with autocast(t.runtime):
        out = t.model(image)
    terms = t.loss_fn(out, batch["label"], batch["presence"])
    t.scaler.scale(terms.total).backward()
    if cfg.train.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), cfg.train.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(_unwrap(t.model))
    return terms


def _train_epoch(trainer: Trainer, loader: DataLoader, epoch: int, progress: bool) -> dict[str, float]:
    cfg, runtime = trainer.cfg, trainer.runtime
    trainer.model.train()
    sums = {"loss": 0.0, "seg_loss": 0.0, "class_loss": 0.0, "aux_loss": 0.0}
    slices, start = 0, time.perf_counter()
    batches = augmented_batches(loader, BatchAugment(cfg.data), epoch, cfg, runtime)
    desc = f"epoch {epoch + 1}/{cfg.train.epochs}"
    bar = tqdm(batches, total=len(loader), desc=desc, unit="batch", leave=False, disable=not progress)
    for batch in bar:
        terms = train_step(trainer, batch)
        n = batch["image"].shape[0]
        slices += n
        for key, value in zip(sums, terms):
            sums[key] += float(value.detach()) * n
        bar.set_postfix(loss=f"{sums['loss'] / slices:.3f}", slices_per_s=f"{slices / (time.perf_counter() - start):.1f}")
    elapsed = time.perf_counter() - start
    metrics = {f"train/{k}": v / max(1, slices) for k, v in sums.items()}
    metrics = _reduce_mean(metrics, runtime)
    metrics["train/slices_per_s"] = slices * runtime.world_size / elapsed
    metrics["train/lr"] = trainer.optimizer.param_groups[0]["lr"]
    return metrics


# --------------------------------------------------------------------------- the stage's steps


@dataclass
class TrainingData:
    """The cases a run trains and validates on (step 1, :func:`prepare_data`)."""

    source: Path  # the dataset folder or datalist (the built-in set's folder when none was given)
    cache: Path  # its preprocessed cache
    train_dirs: list[Path]
    val_dirs: list[Path]
    summary: dict[str, Any]  # the cache's summary.json (cases, input shapes)


@dataclass
class TrainingRun:
    """What the epochs of a run work on and write to (step 2, :func:`start_run`)."""

    cfg: Config
    runtime: Runtime
    data: TrainingData
    trainer: Trainer
    loader: DataLoader
    tracker: RunTracker | NullTracker
    run_id: str | None
    run_dir: Path
    start_epoch: int = 0
    best: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"


def load_resume_state(resume: str, cfg: Config) -> tuple[Config, dict[str, Any], Path]:
    """The checkpoint ``resume`` names (a file, a run folder or an MLflow run ID: its
    ``last.pt``), with the config it was trained with: a run goes on as it started."""
    path = resolve_checkpoint(resume, "last", cfg.train.output_dir, resolve_tracking_uri(cfg))
    state = load_checkpoint(path)
    log.info("resuming from %s (epoch %d done)", path, state["epoch"] + 1)
    return config_of(state), state, path


def prepare_data(cfg: Config, data: str | Path | None, runtime: Runtime, progress: bool) -> TrainingData:
    """Step 1: the preprocessed cache of the dataset, split into training and validation cases.

    Without a dataset (``data`` and ``data.root`` both unset) the built-in synthetic set is
    generated first (once; :mod:`brats_psp.data.builtin`). Rank 0 prepares the cache; the other
    processes wait for it and then find it complete.
    """
    if data is None and not cfg.data.root:
        log.info("no dataset given: training on the built-in synthetic set (%d cases, seed %d)", cfg.data.demo_cases, cfg.data.demo_seed)
    source = cache = None
    if runtime.is_main:
        source = resolve_data_source(cfg.data, data)
        cache = ensure_training_cache(cfg.data, source, progress=progress)
    if runtime.distributed:
        dist.barrier()
        if not runtime.is_main:
            source = resolve_data_source(cfg.data, data)
            cache = ensure_training_cache(cfg.data, source, progress=False)
    assert source is not None and cache is not None
    train_dirs, val_dirs = split_cases(cache, cfg.data.fold)
    if not train_dirs or not val_dirs:
        raise ValueError(f"fold {cfg.data.fold} of {cache} leaves {len(train_dirs)} training and {len(val_dirs)} validation case(s); need both")
    return TrainingData(source, cache, train_dirs, val_dirs, read_summary(cache))


def start_run(
    cfg: Config, runtime: Runtime, data: TrainingData, state: dict[str, Any] | None = None, resumed_from: Path | None = None
) -> TrainingRun:
    """Step 2: the data loader, the trainer (restored from ``state`` when resuming, wrapped in
    DDP under ``torchrun``), the MLflow run and the run's folder ``<output_dir>/<run id>``."""
    loader = build_train_loader(cfg, data.train_dirs, runtime)
    if len(loader) == 0:
        raise ValueError(f"train.slices_per_epoch={cfg.train.slices_per_epoch} is less than one batch of {cfg.train.batch_size} per process")
    trainer = Trainer.build(cfg, runtime, len(loader))
    run_id = None
    progress_state: dict[str, Any] = {}
    if state is not None:
        trainer.load_state_dict(state)
        progress_state = {"start_epoch": state["epoch"] + 1, "best": state["best_metric"], "best_epoch": state["best_epoch"]}
        progress_state["history"] = list(state["history"])
        run_id = state.get("run_id")
        set_rng_state(state["rng"])
    if runtime.distributed:
        trainer.model = DistributedDataParallel(trainer.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)

    tracker = make_tracker(cfg, runtime.is_main)
    default_name = f"{cfg.model.name}-r{cfg.model.depth}w{cfg.model.width}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.start(run_id=run_id, run_name=cfg.tracking.run_name or default_name)
    if run_id:
        run_name = run_id
    elif resumed_from is not None:  # an offline run goes on in its own folder
        run_name = resumed_from.resolve().parent.parent.name
    else:
        run_name = f"offline-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, run_name = _broadcast((run_id, run_name), runtime)
    run = TrainingRun(cfg, runtime, data, trainer, loader, tracker, run_id, Path(cfg.train.output_dir) / run_name, **progress_state)
    tracker.fallback_dir = run.run_dir
    if runtime.is_main:
        for stale in remove_stale_temporaries(run.last_path.parent):  # a kill during a checkpoint write leaves one
            log.warning("removed %s, half written by a run that was killed", stale)
        if resumed_from is not None and not run.best_path.exists() and (resumed_from.parent / "best.pt").is_file():
            # resumed from a checkpoint outside this run's folder: bring its best model along
            save_checkpoint(run.best_path, load_checkpoint(resumed_from.parent / "best.pt"))
        mark_running(run.run_dir)  # sync-mlflow waits for the end of the run
    return run


def log_run_setup(run: TrainingRun) -> None:
    """The resolved config (``config.yaml``, params) and the dataset, device and model size, in
    MLflow and the log (rank 0)."""
    cfg, data, model = run.cfg, run.data, run.trainer.model
    save_config(cfg, run.run_dir / "config.yaml")
    run.tracker.set_tags({"brats_psp.run_dir": str(run.run_dir.resolve()), "brats_psp.stage": "train"})
    run.tracker.log_config(
        cfg,
        {
            "git_commit": git_commit(),
            "device": run.runtime.describe(),
            "dataset.source": str(data.source),
            "dataset.cache": str(data.cache),
            "dataset.cases": data.summary.get("cases", "?"),
            "dataset.train_cases": len(data.train_dirs),
            "dataset.val_cases": len(data.val_dirs),
            "dataset.input_shapes": data.summary.get("input_shapes", "?"),
            "model.parameters": count_parameters(model),
        },
    )
    run.tracker.log_artifact(run.run_dir / "config.yaml")
    run.tracker.log_case_set(training_case_set("train cases", data.train_dirs, data.source), "training")
    run.tracker.log_case_set(training_case_set("validation cases", data.val_dirs, data.source), "validation")
    run.tracker.backfill(run.history)  # a resumed run gets the epochs a kill kept from MLflow
    log.info(
        "run %s: %d train / %d val cases, %d slices per epoch, %s, %d parameters",
        run.run_id, len(data.train_dirs), len(data.val_dirs), cfg.train.slices_per_epoch, run.runtime.describe(), count_parameters(model),
    )


def training_case_set(name: str, case_dirs: list[Path], source: Path) -> dict[str, Any]:
    """The cache entries ``case_dirs`` as an MLflow dataset: case ids, layouts and a digest of
    the entries' fingerprints (the same cases preprocessed the same way give the same digest)."""
    metas = [load_entry_meta(d, verify=False) or {"case_id": d.name} for d in case_dirs]
    fingerprints = hashlib.sha1("|".join(sorted(str(m.get("fingerprint")) for m in metas)).encode()).hexdigest()[:10]
    extra = {"layouts": sorted({str(m.get("layout")) for m in metas}), "cache_fingerprint": fingerprints}
    return case_set(name, [m["case_id"] for m in metas], str(source), extra)


def checkpoint_payload(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """What ``last.pt`` / ``best.pt`` hold after ``epoch`` (see :mod:`brats_psp.checkpoint`)."""
    return {
        **run.trainer.state_dict(),
        "epoch": epoch,
        "best_metric": run.best,
        "best_epoch": run.best_epoch,
        "rng": rng_state(),
        "config": config_to_dict(run.cfg),
        "preprocessing": preprocessing_params(run.cfg.data.spacing, run.cfg.data.intensity_percentiles),
        "data_source": str(run.data.source),
        "run_id": run.run_id,
        "history": run.history,
    }


def run_epoch(run: TrainingRun, epoch: int, progress: bool) -> dict[str, float]:
    """Step 3, once per epoch: train, validate when due (``train.val_every`` and the last epoch), write
    ``last.pt`` (and ``best.pt`` when validation improved) and log the metrics."""
    from brats_psp.plots import plot_validation_overlay

    cfg, runtime = run.cfg, run.runtime
    # every random draw of the epoch follows from (seed, epoch): resuming reproduces it
    seed_loader_epoch(run.loader, epoch, cfg, runtime)
    metrics = _train_epoch(run.trainer, run.loader, epoch, progress)
    improved = False
    if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
        val, example = validate(run.trainer.eval_model, run.data.val_dirs, cfg, runtime, progress)
        metrics.update(val)
        improved = val["val/dice_mean"] > run.best
        if improved:
            run.best, run.best_epoch = val["val/dice_mean"], epoch
        if runtime.is_main and example is not None:
            plot_validation_overlay(example, run.run_dir / "val_overlay.png", title=f"epoch {epoch + 1}")
    run.history.append({"epoch": epoch, **metrics})
    if runtime.is_main:
        ckpt = checkpoint_payload(run, epoch)
        save_checkpoint(run.last_path, ckpt)
        if improved:
            save_checkpoint(run.best_path, ckpt)
        run.tracker.log_metrics(metrics, step=epoch)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def finish_run(run: TrainingRun) -> TrainResult:
    """Step 4: learning curves, history, the best checkpoint (the last one stands in when no
    validation ran) with its thresholds calibrated on the validation cases
    (``train.calibrate_threshold``), and the MLflow model, logged to the run.

    Every process calls it (under torchrun the calibration's cases are shared out); rank 0
    alone writes and logs.
    """
    from brats_psp.plots import plot_learning_curves

    cfg, run_dir, tracker = run.cfg, run.run_dir, run.tracker
    if run.runtime.is_main:
        plot_learning_curves(run.history, run_dir / "learning_curves.png")
        write_json(run_dir / "history.json", run.history)
        for artifact in ("learning_curves.png", "val_overlay.png", "history.json"):
            if (run_dir / artifact).exists():
                tracker.log_artifact(run_dir / artifact)
        if not run.best_path.exists():  # no validation ran (train.val_every > train.epochs)
            log.warning("no validation ran, so there is no best checkpoint: %s stands in for it", run.last_path)
            save_checkpoint(run.best_path, load_checkpoint(run.last_path))
    best = calibrate_best_checkpoint(run)
    if not run.runtime.is_main:
        return run_result(run)
    tracker.log_artifact(run.best_path, "checkpoints")
    if cfg.tracking.log_model:
        best_model = build_model_from_checkpoint(best if best is not None else load_checkpoint(run.best_path))
        wrapped = RegionProbabilities(best_model, cfg.model.output)
        example_input = torch.zeros(1, cfg.data.in_channels, *cfg.infer.roi_size)
        tracker.log_model(wrapped, example_input, cfg.tracking.register_name, checkpoint=run.best_path)
    tracker.log_metrics({"best/dice_mean": run.best, "best/epoch": run.best_epoch}, step=cfg.train.epochs - 1)
    return run_result(run)


def run_result(run: TrainingRun) -> TrainResult:
    return TrainResult(run.run_id, run.run_dir, run.best_path, run.last_path, run.best, run.history)


# --------------------------------------------------------------------------- the stage


def train(
    cfg: Config,
    data: str | Path | None = None,
    resume: str | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a PSPNet as ``cfg`` says and return where the run and its checkpoints are.

    The steps: :func:`prepare_data` (the built-in set when no dataset is given) ->
    :func:`start_run` (loader, trainer, MLflow run, run folder) -> :func:`run_epoch` for each
    epoch -> :func:`finish_run` (curves, best checkpoint, MLflow model).

    Args:
        cfg: the resolved config.
        data: dataset folder or datalist (default ``data.root``, else the built-in synthetic set).
        resume: a checkpoint file, a run folder's name or an MLflow run ID to continue (its
            ``last.pt``, with the config and data it started with).
        progress: show progress bars.
        on_epoch_end: called with (epoch, metrics) after each epoch's checkpoint is written.
    """
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    progress = progress and runtime.is_main
    state = resumed_from = None
    if resume:
        cfg, state, resumed_from = load_resume_state(resume, cfg)
        data = data if data is not None else state.get("data_source")
    seed_everything(cfg.train.seed + runtime.rank, cfg.train.deterministic)
    prepared = prepare_data(cfg, data, runtime, progress)
    run = start_run(cfg, runtime, prepared, state, resumed_from)
    status = "FAILED"
    try:
        if runtime.is_main:
            log_run_setup(run)
        for epoch in range(run.start_epoch, cfg.train.epochs):
            metrics = run_epoch(run, epoch, progress)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
        result = finish_run(run)
        status = "FINISHED"
    finally:
        run.tracker.end(status)
        if runtime.is_main:
            clear_running(run.run_dir)
        run.trainer.model = _unwrap(run.trainer.model)  # DDP's reducer holds the process group
        shutdown(runtime, finished=status == "FINISHED")
    return result
