"""`--log-with tensorboard`: the run's metrics as TensorBoard scalars, and its sample grids as images.

metrics.jsonl stays the record of a run; every number in it also goes here, under kohya's tag names where kohya
has one (`loss/current`, `loss/average`, `lr/unet`, `lr/textencoder`), so runs of both trainers overlay in
one TensorBoard.

Folders (kohya's `--logging_dir`/`--log_prefix` layout): `<logging-dir>/<log-prefix><YYYYmmdd-HHMMSS>/`, with
`--logging-dir` defaulting to `<output-dir>/logs` and `--log-prefix` to `<output-name>-`. The training state
records the run folder, so a resumed run writes a new event file into the same folder and its curves go on at
the same step numbers.

Only the main process writes. `torch.utils.tensorboard.SummaryWriter` rather than accelerate's tracker:
`Accelerator.end_training()` also destroys the process group, while sd_lora closes its outputs before the
processes' last `wait_for_everyone()`; and the Accelerator exists only once the model is loaded, after the
check that the package is installed must already have been made.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np

from .errors import UserError
from .options import TrainConfig

# metrics.jsonl key -> TensorBoard tag. kohya's loss/average is the mean over the last epoch's steps; ours is
# the exponential moving average the progress bar shows.
TAGS = {
    "loss": "loss/current",
    "loss_average": "loss/average",
    "val_loss": "loss/validation",
    "lr": "lr/unet",
    "lr_text_encoder": "lr/textencoder",
    "d_lr": "lr/d*lr/unet",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
    "rss_mb": "memory/rss_mb",
}


def check_available(config: TrainConfig) -> None:
    """Before the model loads: --log-with tensorboard needs the `tensorboard` package (SummaryWriter writes with it)."""
    if config.log_with != "tensorboard":
        return
    try:
        importlib.import_module("tensorboard")
    except ImportError:
        raise UserError("--log-with tensorboard: the tensorboard package is not installed; install it with "
                        "pip install 'sd_lora[tensorboard]' (or pip install tensorboard), or drop --log-with") from None


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record, by tag. Values that are not numbers (a skipped step's
    "nan" strings, an fp16 overflow step's missing grad_norm) are left out, as TensorBoard would plot them as gaps."""
    return {tag: float(record[key]) for key, tag in TAGS.items()
            if isinstance(record.get(key), (int, float)) and not isinstance(record[key], bool)}


def logging_dir(config: TrainConfig) -> Path:
    return config.logging_dir if config.logging_dir is not None else config.output_dir / "logs"


def run_name(prefix: str, started: float) -> str:
    """kohya's run folder name: the prefix, then the local date and time the run started."""
    return prefix + time.strftime("%Y%m%d-%H%M%S", time.localtime(started))


def new_run(config: TrainConfig, started: float) -> str:
    """A run folder name under --logging-dir not taken yet (two runs started in the same second get -2, -3...)."""
    name = run_name(config.log_prefix if config.log_prefix is not None else f"{config.output_name}-", started)
    root, unique, n = logging_dir(config), name, 1
    while (root / unique).exists():
        n += 1
        unique = f"{name}-{n}"
    return unique


class TensorBoardLog:
    """One run's event file in `folder`. `start_step`: the step a resumed run continues from; TensorBoard drops the
    events of later steps an earlier file in the folder holds (a run that went on past the resumed state), as
    metrics.jsonl drops their lines. Each `write` is flushed, like metrics.jsonl's lines: a crash loses nothing."""

    def __init__(self, folder: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a sample grid) at `step`."""
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
