"""Why a trained run predicts nothing while its training loss falls: the network's head, measured.

For each validation case of a run (its `split.json`), the network's foreground logits are read at
the truth's foreground and background pixels (training size, the cached soft labels > 0.5), with

- the head's bias (the 1x1 output conv) and the largest foreground logit: equal when every
  foreground pixel reaches the head with all last-stage channels at zero (ReLU), so the head can
  only output its bias there;
- the share of foreground pixels where every channel entering the head is 0 (and the same for
  background): such pixels pass no gradient through the ReLU, so training cannot lift them;
- the slice Dice at the 0.5 threshold and at the best threshold over the logits' range: a network
  that separates lung from background but never crosses 0.5 scores 0 at 0.5 and high at the best.

    PYTHONPATH=. .venv/bin/python benchmarks/diagnose_empty_predictions.py --run RUN \
        --case-dir CASES [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctseg.data.cache import cache_case
from ctseg.data.cases import discover_cases
from ctseg.infer.model_loader import LAST, load_model
from ctseg.infer.volume import preprocess_volume


def head_of(model: torch.nn.Module) -> torch.nn.Conv2d:
    """The network's last Conv2d: the 1x1 head that turns last-stage channels into logits."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    total = int(pred.sum() + truth.sum())
    return 2.0 * int((pred & truth).sum()) / total if total else float("nan")


def diagnose(run: Path, case_dir: Path, cache_dir: Path | None) -> list[dict]:
    loaded = load_model(run / "checkpoints" / LAST, device="cpu")
    model, config = loaded.model.eval(), loaded.config
    head = head_of(model)
    entering: list[torch.Tensor] = []
    head.register_forward_hook(lambda module, args, out: entering.append(args[0].detach()))
    cases = {c.name: c for c in discover_cases(case_dir)}
    rows = []
    for name in json.loads((run / "split.json").read_text())["val"]:
        cached = cache_case(cases[name], config, cache_dir)
        inputs = preprocess_volume(cached.hu, config, spacing_yx=cached.spacing[1:])
        entering.clear()
        with torch.inference_mode():
            logits = model(inputs)[:, 0]
        truth = torch.from_numpy(np.asarray(cached.train_label)).reshape(logits.shape) > 0.5
        dead = (entering[0] <= 0).all(dim=1)
        fg, bg = logits[truth], logits[~truth]
        thresholds = torch.linspace(float(logits.min()), float(logits.max()), 64)
        best = max((dice(logits > t, truth), float(t)) for t in thresholds)
        rows.append({"case": name, "head_bias": float(head.bias.detach()[0]), "fg_logit_max": float(fg.max()),
                     "fg_logit_mean": float(fg.mean()), "bg_logit_max": float(bg.max()),
                     "bg_logit_mean": float(bg.mean()), "fg_all_channels_zero": float(dead[truth].float().mean()),
                     "bg_all_channels_zero": float(dead[~truth].float().mean()),
                     "slice_dice_at_0.5": dice(logits > 0, truth), "best_dice": best[0],
                     "best_logit_threshold": best[1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--case-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    for row in diagnose(args.run, args.case_dir, args.cache_dir):
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
