"""Slices of cached volumes as training samples, with optional 2.5D context and fg/bg sampling.

The network is 2D; a sample is one axial slice at the training size. With `data.context` = k > 1
(odd) the k neighbouring slices centred on it become the input channels ("2.5D"), clamped at the
ends of the volume; the predictor stacks slices the same way (`stack_context`). Lung slices are a
minority at the ends of a thoracic scan, so `data.foreground_ratio` sets the share of sampled
slices that contain foreground (None keeps the natural proportion).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ctseg.data.cache import CachedCase
from ctseg.errors import ConfigError
from ctseg.slices import context_indices, context_slices, stack_context  # the training side's names


class SliceDataset(Dataset):
    """Every slice of the given cached cases: {"image": (k,H,W), "label": (C,H,W), "case", "slice"}.

    `label` holds soft targets (see `CachedCase.train_label`): one foreground channel for a
    binary task, one channel per class otherwise.

    Only the cases passed in are ever read, so building it from the split's training cases alone
    is what guarantees no validation slice reaches training.
    """

    def __init__(self, cases: Sequence[CachedCase], context: int = 1,
                 transform: Callable[[dict], dict] | None = None) -> None:
        self.cases = list(cases)
        self.context = context
        self.transform = transform
        self.index = [(c, z) for c, case in enumerate(self.cases) for z in range(case.shape[0])]
        self.foreground = np.concatenate([case.foreground for case in self.cases]) if self.cases \
            else np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        c, z = self.index[i]
        case = self.cases[c]
        picks = context_indices(z, case.shape[0], self.context)
        sample = {
            "image": np.asarray(case.train_image[picks], dtype=np.float32),
            "label": np.array(case.train_label[z], dtype=np.float32),
            "case": case.name,
            "slice": z,
        }
        return self.transform(sample) if self.transform is not None else sample


class ForegroundRatioSampler(Sampler[int]):
    """Draws `num_samples` slice indices, a `ratio` share of them (on average) with foreground.

    Seeded from its own generator (set per epoch by the trainer), so an epoch's slices are a
    function of (seed, epoch) alone, which makes `--resume` reproduce an uninterrupted run.
    """

    def __init__(self, foreground: np.ndarray, num_samples: int, ratio: float | None,
                 generator: torch.Generator) -> None:
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"data.foreground_ratio must be in [0, 1] or null, got {ratio}")
        self.fg = torch.as_tensor(np.flatnonzero(foreground))
        self.bg = torch.as_tensor(np.flatnonzero(~foreground))
        self.total = len(foreground)
        self.num_samples = num_samples
        self.ratio = ratio
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = self.generator
        if self.ratio is None or len(self.fg) == 0 or len(self.bg) == 0:
            # Natural proportion: shuffled passes over all slices, each slice once per pass.
            rounds = -(-self.num_samples // self.total)
            picks = torch.cat([torch.randperm(self.total, generator=g) for _ in range(rounds)])
            picks = picks[: self.num_samples]
        else:
            from_fg = torch.rand(self.num_samples, generator=g) < self.ratio
            fg = self.fg[torch.randint(len(self.fg), (self.num_samples,), generator=g)]
            bg = self.bg[torch.randint(len(self.bg), (self.num_samples,), generator=g)]
            picks = torch.where(from_fg, fg, bg)
        return iter(picks.tolist())
