"""Regularisation (prior-preservation) images, as kohya's `reg_data_dir` uses them.

They train alongside the user's images with their own captions, so that what the base already draws for
those captions stays as it was. Each epoch sees as many regularisation samples as training samples (repeats
counted): fewer regularisation images are repeated, more are partly left out - always the same ones, so a
run is reproducible and resumable.
"""

from __future__ import annotations

import dataclasses

from .scan import ImageRecord


def regularization_records(records: list[ImageRecord], samples_per_epoch: int) -> list[ImageRecord]:
    """`records` marked as prior images with repeats summing to `samples_per_epoch`.

    Every image gets `samples_per_epoch // n` repeats and the first `samples_per_epoch % n` one more; with
    more images than samples the later ones get none and are dropped. Folder repeats (`N_name`) are ignored:
    the balance with the training images decides.
    """
    if not records or samples_per_epoch <= 0:
        return []
    base, extra = divmod(samples_per_epoch, len(records))
    out = []
    for i, record in enumerate(records):
        repeats = base + (1 if i < extra else 0)
        if repeats:
            out.append(dataclasses.replace(record, repeats=repeats, prior=True))
    return out
