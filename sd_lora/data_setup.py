"""The data of a run made ready to train: which records train, validate and regularise, the options every
image is prepared with, the held-out images' fixed latents, and the DataLoader with its worker processes or
its prefetch thread.

`train.train_lora` calls these: the record sets before any model loads (a bad folder fails fast), the rest
once it has (buckets follow its pixel step). The model appears only through the VAE that encodes the
held-out images.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from pathlib import Path

import torch

from . import loop
from .config import TrainConfig
from .errors import UserError
from .data import (BucketBatchSampler, DataOptions, ImageDataset, build_latent_cache, collate, image_warnings,
                   regularization_records, scan_dataset)
from .data.kohya_dataset_config import balance_regularization, read_dataset_config, scan_subsets
from .models.load import BaseModel
from .validation import build_validation_set, split_records


def scan_option(flag: str, folder, config: TrainConfig, taken_labels=()):
    """scan_dataset for a second image folder (--validation-data, --reg-data): its problems name the option.
    `taken_labels`: the training images' folder labels, which its folders' labels must not repeat."""
    try:
        return scan_dataset(folder, caption_extension=config.caption_extension, skip_bad_images=config.skip_bad_images,
                            exclude=run_folders(config), taken_labels=taken_labels)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def run_folders(config: TrainConfig) -> dict[Path, str]:
    """The folders the run writes into, never read as images (with why): --output-dir inside --data would otherwise
    train on its own sample grids from the next run on (and a --resume would find the data changed). Its samples
    folder too, for an --output-dir that is --data itself."""
    whys = {config.logging_dir: "it is --logging-dir (this run writes its logs there)",
            config.latent_cache_dir: "it is --latent-cache-dir (this run writes its cached latents there)",
            config.output_dir: "this run writes its outputs there (its sample grids would become training images)",
            config.samples_dir: "this run writes its sample grids there (they would become training images)"}
    return {p: why for p, why in whys.items() if p is not None}


def other_image_folders(config: TrainConfig) -> dict[Path, str]:
    """--validation-data and --reg-data, never read as --data's images (with why): inside --data, held-out images
    would train, and regularisation images would train twice, once as training images."""
    folders = {config.validation_data: "it is --validation-data (held-out images must not train)",
               config.reg_data: "it is --reg-data (its images train as regularisation images only)"}
    return {p: why for p, why in folders.items() if p is not None}


def scan_training_data(config: TrainConfig):
    """The training images: --data's folder, or the training subsets of --dataset-config (its is_reg subsets
    are `regularization_set`'s)."""
    if config.dataset_config is None:
        return scan_dataset(config.data, caption_extension=config.caption_extension, skip_bad_images=config.skip_bad_images,
                            exclude={**run_folders(config), **other_image_folders(config)})
    return scan_subsets(read_dataset_config(config.dataset_config), prior=False, caption_extension=config.caption_extension,
                        skip_bad_images=config.skip_bad_images)


def split_validation(config: TrainConfig, scan, show: bool = True) -> tuple[list, list]:
    """(training records, validation records) from --validation-split or --validation-data. `show` prints the
    --validation-data scan's warnings (on the main process only), as `regularization_set` prints --reg-data's."""
    if config.validation_data is not None:
        held = scan_option("--validation-data", config.validation_data, config)
        for warning in held.warnings if show else []:
            print(f"warning: --validation-data: {warning}", file=sys.stderr)
        return list(scan.records), list(held.records)
    return split_records(scan.records, config.validation_split, config.seed)


def regularization_set(config: TrainConfig, train_records: list, show: bool = True) -> tuple[list, list]:
    """--reg-data (or a dataset config's is_reg subsets): (its images as prior records, as many samples per epoch
    as the training images (a dataset config's: as those of their own [[datasets]]); its images as found, whose
    metadata kohya writes: `reg_dataset_metadata`, and their tags in `dataset_metadata`). `show` prints its
    warnings and summary (on the main process only)."""
    if config.dataset_config is not None:  # its is_reg subsets
        kohya = read_dataset_config(config.dataset_config)
        scan = scan_subsets(kohya, prior=True, caption_extension=config.caption_extension, skip_bad_images=config.skip_bad_images)
        source, flag = f"the is_reg subsets of {config.dataset_config}", "--dataset-config"
        if not scan.records:
            return [], []
        records, more = balance_regularization(kohya, train_records, scan.records)
        scan.warnings += more
    elif config.reg_data is None:
        return [], []
    else:
        # (labels apart from the training folders': a root-level "reg" beside "train", or "reg/1_person" beside "1_person")
        scan = scan_option("--reg-data", config.reg_data, config, taken_labels={r.folder for r in train_records})
        source, flag = config.reg_data, "--reg-data"
        records = regularization_records(scan.records, sum(r.repeats for r in train_records))
    for warning in scan.warnings if show else []:
        print(f"warning: {flag}: {warning}", file=sys.stderr)
    if show:
        print(f"regularisation: {len(records)} of {len(scan.records)} images from {source}, "
              f"{sum(r.repeats for r in records)} samples per epoch, loss weight {config.prior_loss_weight:g}")
    return records, scan.records


def data_options(config: TrainConfig, step: int) -> DataOptions:
    return DataOptions(
        resolution=config.resolution, step=step, min_bucket_side=config.min_bucket_side,
        max_bucket_side=config.max_bucket_side, buckets=config.buckets, no_upscale=config.no_upscale,
        random_crop=config.random_crop, flip=config.flip, shuffle_tags=config.shuffle_tags,
        keep_tokens=config.keep_tokens, caption_dropout=config.caption_dropout, tag_dropout=config.tag_dropout, seed=config.seed,
    )


def validation_sizes(dataset: ImageDataset, index: int) -> dict:
    """SDXL size conditioning of a held-out image, from its centre crop."""
    record, plan = dataset.records[index], dataset.crop_plan(index)
    width, height = dataset.bucket_of[index]
    return {
        "original_size": torch.tensor([record.height, record.width]),
        "crop_top_left": torch.tensor([plan.top, plan.left]),
        "target_size": torch.tensor([height, width]),
    }


def vae_encoder(model: BaseModel, accelerator, generator: torch.Generator):
    """pixels (B, 3, H, W) in [-1, 1] on the CPU -> scaled latents on the CPU: the latent cache's `encode`."""
    scaling = float(model.vae.config.scaling_factor)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return loop.encode_pixels(model.vae, pixels.to(accelerator.device, model.vae.dtype), scaling, generator).float().cpu()
    return encode


def build_validation(config: TrainConfig, model: BaseModel, accelerator, records: list, options: DataOptions) -> list:
    """Held-out images as fixed (latents, caption, noise, timestep, sizes): centre crops, no flips, encoded
    with their own generator so that the training draws do not depend on the validation set."""
    if not records:
        return []
    held = ImageDataset(records, dataclasses.replace(options, flip=False, random_crop=False))
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + 1)
    cache = build_latent_cache(held, vae_encoder(model, accelerator, generator), batch_size=config.batch_size,
                               progress=accelerator.is_main_process)
    return build_validation_set(
        [cache.get(i, False) for i in range(len(held))], [r.caption for r in records],
        [validation_sizes(held, i) for i in range(len(held))], seed=config.seed, num_train_timesteps=model.num_train_timesteps,
    )


def data_loader(config: TrainConfig, dataset: ImageDataset, accelerator) -> torch.utils.data.DataLoader:
    """Batches of `dataset`: one bucket per global batch, each process taking its slice (`loader.batch_sampler`
    is the BucketBatchSampler; call its `set_epoch` before each epoch)."""
    batch_sampler = BucketBatchSampler(
        dataset.bucket_of, [r.repeats for r in dataset.records], config.batch_size, config.seed,
        num_replicas=accelerator.num_processes, rank=accelerator.process_index,
    )
    # The loader gets its own generator: by default each new iterator draws a seed from the global torch RNG,
    # which would shift LoRA-dropout draws after a resume. (Sample randomness comes from the sampler's seeds.)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,  # not re-forked (and re-imported) at every epoch
        worker_init_fn=image_warnings.drop_in_worker,  # the scan reported Pillow's warnings about these images
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=accelerator.device.type == "cuda",  # page-locked batches reach the GPU without a wait
    )


class Prefetch:
    """Iterates `loader` one batch ahead in a background thread, so that decoding and resizing the next
    images overlaps the current step instead of following it. Used when latents are not cached and
    `--num-workers` is 0 (worker processes would do the same, at a memory cost). The order is the loader's,
    an exception (a bad image's UserError) reaches the training thread, and leaving an epoch early stops the
    thread. A thread can overlap the step because PIL's decode and resize and torch's ops release the GIL."""

    def __init__(self, loader, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.loader:
                    if not offer(("batch", batch)):
                        return
                offer(("end", None))
            except BaseException as e:  # handed to the training thread, which raises it
                offer(("error", e))

        thread = threading.Thread(target=produce, name="sd_lora-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a persistent DataLoader's worker processes. The returned TrainResult keeps the loader (through its
    outputs), and in a notebook its workers would otherwise live on, each holding memory, after `run()` returns.
    Hack: DataLoader has no public call for this; its iterator's `__del__` does the same."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
