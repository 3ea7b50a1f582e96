"""An exponential moving average of a network's weights, the model that validation, ``best.pt``
and inference use when ``train.ema_decay`` is set.

After every optimisation step each floating-point tensor of the state dict (weights and the
BatchNorm running statistics) moves towards the training network's by ``1 - decay_t``, with
``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates (the warm-up of TensorFlow's
``ExponentialMovingAverage`` and timm's ``ModelEmaV2``, so that early averages are not held
back by the random initialisation); integer buffers are copied. The average is a flatter point
of the loss surface than the last step's weights, which averages out the noise of the last
few hundred steps: what ``torch.optim.swa_utils.AveragedModel`` does with
``get_ema_multi_avg_fn``, plus the warm-up.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The moving average of ``model``'s weights, in a copy of it (``module``, in eval mode)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update applies (the warm-up, then ``decay``)."""
        t = self.updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        d = self.current_decay()
        avg, new = [], []
        for a, b in zip(self.module.state_dict().values(), model.state_dict().values()):
            if a.dtype.is_floating_point:
                avg.append(a)
                new.append(b.detach().to(a.dtype))
            else:
                a.copy_(b)
        if avg:
            torch._foreach_lerp_(avg, new, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
