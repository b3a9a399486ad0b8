"""Training: `train()` runs one job (cases -> split -> cache -> DiceCE loop) into a run folder."""

from ctseg.train.loop import train

__all__ = ["train"]
