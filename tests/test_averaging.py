"""The moving average of the weights (``train.ema_decay``): the arithmetic, and a training run
that validates, checkpoints and resumes with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from brats_psp.averaging import WeightEMA
from brats_psp.checkpoint import build_model_from_checkpoint, load_checkpoint
from brats_psp.config import ConfigError
from brats_psp.training import train
from tests.test_training import crash_after_first_epoch_then_resume, smoke_config, tiny_data  # noqa: F401 (the fixture)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))


def test_the_average_follows_the_weights_with_a_warm_up() -> None:
    net = _net()
    ema = WeightEMA(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    # the first update's decay is 2/11 (warm-up), so the average moves most of the way at once
    assert ema.current_decay() == pytest.approx(2 / 11)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].num_batches_tracked += 5
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, w0 + (1 - 2 / 11))
    assert int(ema.module[1].num_batches_tracked) == 5  # integer buffers are copied
    # later, the decay reaches its ceiling: an exponential average of what the weights were
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9 and ema.updates == 201
    torch.testing.assert_close(ema.module[0].weight, w0 + 1.0)
    # the average is a copy: it takes no gradient and the network is untouched by it
    assert not any(p.requires_grad for p in ema.module.parameters()) and net[0].weight.requires_grad
    assert not ema.module.training


def test_the_average_restores_from_its_state() -> None:
    net = _net()
    ema = WeightEMA(net, decay=0.99)
    with torch.no_grad():
        net[0].bias.add_(2.0)
    ema.update(net)
    other = WeightEMA(_net(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    torch.testing.assert_close(other.module.state_dict(), ema.module.state_dict())


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_a_decay_outside_its_range_is_refused(tmp_path: Path, decay: float) -> None:
    with pytest.raises(ConfigError, match="train.ema_decay"):
        smoke_config(tmp_path, f"train.ema_decay={decay}")
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(_net(), decay if decay != -0.1 else 0.0)


def test_training_with_an_average_checkpoints_it_and_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = smoke_config(tmp_path, "train.epochs=3", "train.deterministic=true", "train.val_every=1", "train.ema_decay=0.9")
    full = train(cfg, data=tiny_data, progress=False)
    last = load_checkpoint(full.last_checkpoint)
    # "model" (what infer loads) is the average; the training network's weights travel beside it
    assert last["ema_updates"] == 3 * (cfg.train.slices_per_epoch // cfg.train.batch_size)  # one update per step
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"] if last["model"][k].is_floating_point())
    build_model_from_checkpoint(load_checkpoint(full.best_checkpoint))  # best.pt builds as any checkpoint

    resumed = crash_after_first_epoch_then_resume(cfg, tiny_data)
    again = load_checkpoint(resumed.last_checkpoint)
    assert again["ema_updates"] == last["ema_updates"]
    for key in ("model", "train_model"):
        for name in last[key]:
            torch.testing.assert_close(again[key][name], last[key][name], msg=f"{key}.{name}")
    # the validation that picked best.pt scored the average: its Dice is the history's
    assert [h["val/dice_mean"] for h in resumed.history] == pytest.approx([h["val/dice_mean"] for h in full.history])
