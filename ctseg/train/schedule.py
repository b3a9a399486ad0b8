"""Learning-rate schedules over the run's budget, and the weights' moving average.

Why: ReduceLROnPlateau lets one noisy validation case decide the LR (and, with early stopping,
when the run ends). `optim.schedule: cosine` fixes the LR in advance as a function of how much
of the budget is spent: a linear warm-up from `optim.min_lr` to `optim.lr` over
`optim.warmup_fraction` of it, then a cosine decay that reaches `optim.min_lr` exactly when the
budget ends. The budget is `train.epochs` or, when `train.time_limit_minutes` is set, whichever
of the two runs out first: progress = max(epoch fraction, elapsed-time fraction), clamped to 1
(the run stops at the end of the epoch in which the time runs out; its remaining steps use
`min_lr`). The LR is set after every optimizer step, so the last step leaves `min_lr`.

`train.ema` keeps an exponential moving average of the weights (PyTorch's `AveragedModel` with
`get_ema_multi_avg_fn`, BatchNorm statistics averaged too). Its decay is warmed up as in
TensorFlow's `ExponentialMovingAverage(num_updates=...)`, min(decay, (1 + n) / (10 + n)) after n
updates, so a short run's average is not dominated by the random initial weights.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def cosine_lr(progress: float, lr: float, min_lr: float, warmup_fraction: float) -> float:
    """The LR after `progress` (0..1) of the budget: linear warm-up, then cosine decay to min_lr."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_fraction:
        return min_lr + (lr - min_lr) * p / warmup_fraction
    decay = (p - warmup_fraction) / (1.0 - warmup_fraction)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * decay))


def budget_progress(epoch: int, step: int, steps: int, epochs: int, elapsed_seconds: float,
                    time_limit_seconds: float | None) -> float:
    """The share of the budget spent after `step` of `steps` optimizer steps of `epoch` (1-based)
    and `elapsed_seconds` of run time: the larger of the epoch and time fractions, at most 1."""
    spent = (epoch - 1 + step / max(steps, 1)) / epochs
    if time_limit_seconds is not None:
        spent = max(spent, elapsed_seconds / time_limit_seconds)
    return min(spent, 1.0)


class BudgetCosine:
    """Sets the optimizer's LR from the budget's progress (`step(progress)` after each optimizer step).

    Stateless apart from the last progress (kept for the checkpoint): the LR of a resumed run is
    the one restored with the optimizer, and the next step recomputes it from epoch and time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float,
                 warmup_fraction: float) -> None:
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_fraction = lr, min_lr, warmup_fraction
        self.progress = 0.0
        self._apply()

    def step(self, progress: float) -> None:
        self.progress = max(self.progress, progress)  # never back up (time and epochs only grow)
        self._apply()

    def _apply(self) -> None:
        lr = cosine_lr(self.progress, self.lr, self.min_lr, self.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"schedule": "cosine", "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.progress = float(state["progress"])  # the optimizer's own state holds the LR itself


class WarmEMA:
    """An exponential moving average of a model's weights and buffers, decay warmed up (see module)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: torch.nn.Module) -> None:
        n = self.updates
        self.averaged.multi_avg_fn = get_ema_multi_avg_fn(min(self.decay, (1.0 + n) / (10.0 + n)))
        self.averaged.update_parameters(model)

    def load(self, weights: dict, updates: int) -> None:
        self.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(updates)
