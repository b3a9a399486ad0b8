"""Where the lung model shipped inside the package lives: `ctseg predict` without --model uses it.

`lungs.pt` is written by `ctseg package-model` (reproduced by `make pretrained`): the network's
registry arguments, its config without local paths, and its weights in half precision, so the
package stays small (at most MAX_BYTES); `MODEL_CARD.md` beside it says what it was trained on,
how, its cross-validation figures and its limits. Both ship as package data (pyproject.toml).
Only names live here; `ctseg.infer.model_loader.load_model` reads the file, `ctseg.infer.package`
writes it.
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
WEIGHTS = FOLDER / "lungs.pt"
CARD_NAME = "MODEL_CARD.md"
#: The `format` entry of a packaged model file (training checkpoints have none).
FORMAT = "ctseg-pretrained/1"
#: A packaged model larger than this is refused (the wheel carries it).
MAX_BYTES = 2 * 1024 * 1024
#: How to build the file when this checkout has none.
BUILD_HINT = "build it with `make pretrained CASE_DIR=../shared/data/lctsc`"
