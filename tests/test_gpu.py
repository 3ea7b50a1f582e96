"""The CUDA paths: mixed-precision training, inference against the CPU, checkpoints across devices.

Skipped without a CUDA device (CI has none). Run on a GPU machine with
``python -m pytest tests/test_gpu.py`` (``benchmarks/gpu_check.sh`` runs it with the GPU benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from brats_psp.config import Config, load_config
from brats_psp.data.discovery import discover_cases
from brats_psp.inference import predict_volume
from brats_psp.networks import build_network
from brats_psp.runtime import setup_runtime
from brats_psp.checkpoint import load_model
from brats_psp.segment import segment_cases
from brats_psp.training import Trainer, train, train_step
from tests.conftest import REPO, write_case
from tests.test_training import smoke_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _network(seed: int = 0) -> tuple[torch.nn.Module, Config]:
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    torch.manual_seed(seed)
    return build_network(cfg.model, cfg.data.in_channels).eval(), cfg


@pytest.mark.parametrize("precision, max_mean_diff", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_gpu_probabilities_match_the_cpu(precision: str, max_mean_diff: float) -> None:
    net, cfg = _network()
    image = torch.randn(4, 40, 44, 24, generator=torch.Generator().manual_seed(1))
    cpu = predict_volume(net, image, cfg.infer, setup_runtime("cpu", "fp32"), cfg.model.output)
    gpu = predict_volume(net.cuda(), image, cfg.infer, setup_runtime("cuda", precision), cfg.model.output)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32 and gpu.shape == cpu.shape == (3, 40, 44, 24)
    diff = (gpu - cpu).abs()
    assert float(diff.mean()) < max_mean_diff, (precision, float(diff.mean()), float(diff.max()))
    assert float(((gpu > 0.5) == (cpu > 0.5)).float().mean()) > 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_lower_the_loss_on_one_batch(precision: str) -> None:
    """bf16 autocast, and fp16 with its gradient scaler, fit one fixed batch."""
    _, cfg = _network()
    cfg.train.precision = precision
    runtime = setup_runtime("cuda", precision)
    assert runtime.precision == precision
    trainer = Trainer.build(cfg, runtime, steps_per_epoch=100)
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 4, 64, 64, generator=g)
    label = torch.zeros(8, 3, 64, 64)
    label[:, :, 20:40, 24:44] = 1.0
    image[:, :, 20:40, 24:44] += 2.0  # a bright square the network can learn to find
    batch = {"image": image.pin_memory(), "label": label.pin_memory(), "presence": torch.ones(8, 3).pin_memory()}
    losses = [float(train_step(trainer, batch).total.detach()) for _ in range(30)]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_train_on_gpu_then_segment_on_gpu_and_on_cpu(tmp_path: Path) -> None:
    """The training stage on CUDA (auto precision, pinned loader) with a real MLflow store; its
    checkpoint loads on the CPU, and both devices segment a case into the same labels."""
    raw = tmp_path / "raw"
    for i in range(4):
        write_case(raw, "brats2021", f"BraTS2021_{i:05d}", shape=(48, 52, 28), seed=i)
    cfg = smoke_config(tmp_path, "train.device=cuda", "train.num_workers=2")
    result = train(cfg, data=raw, progress=False)
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["device"].startswith(torch.cuda.get_device_name())
    metrics = run.data.metrics
    assert metrics["val/dice_mean"] == pytest.approx((metrics["val/dice_WT"] + metrics["val/dice_TC"] + metrics["val/dice_ET"]) / 3)
    assert metrics["best/dice_mean"] == pytest.approx(result.best_metric)

    loaded = load_model(str(result.best_checkpoint))  # saved from the GPU, loaded on the CPU
    assert next(loaded.network.parameters()).device.type == "cpu"
    outputs = {}
    for device in ("cuda", "cpu"):
        loaded.config.train.device = device
        res = segment_cases(loaded, raw, tmp_path / device, progress=False)
        assert not res.failures and len(res.written) == 4
        outputs[device] = {cid: np.asarray(nib.load(str(p)).dataobj) for cid, p in res.written.items()}
    for cid in outputs["cpu"]:
        agree = float((outputs["cuda"][cid] == outputs["cpu"][cid]).mean())
        assert agree > 0.99, (cid, agree)
    assert [c.case_id for c in discover_cases(raw).cases] == sorted(outputs["cpu"])
