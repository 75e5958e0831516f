"""Training data: scan a folder into records, bucket and augment them, batch them, cache their latents.

Data flows images -> scan -> (captions, buckets) -> dataset -> latent_cache. Nothing here imports model code;
the VAE reaches `build_latent_cache` only as an `encode` callable.
"""

from sd_lora.data.buckets import CropPlan, choose_bucket, make_buckets, plan_crop, square_bucket
from sd_lora.data.captions import process_caption, split_tags
from sd_lora.data.dataset import BucketBatchSampler, DataOptions, ImageDataset, collate
from sd_lora.data.images import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE, ImageProblem, check_image, open_image
from sd_lora.data.latent_cache import LatentCache, build_latent_cache
from sd_lora.data.regularization import regularization_records
from sd_lora.data.scan import ImageRecord, ScanResult, fingerprint, scan_dataset
from sd_lora.data.ss_metadata import dataset_metadata, reg_dataset_metadata

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "BucketBatchSampler",
    "CropPlan",
    "DataOptions",
    "ImageDataset",
    "ImageProblem",
    "ImageRecord",
    "LatentCache",
    "ScanResult",
    "build_latent_cache",
    "check_image",
    "choose_bucket",
    "collate",
    "dataset_metadata",
    "fingerprint",
    "make_buckets",
    "open_image",
    "plan_crop",
    "reg_dataset_metadata",
    "regularization_records",
    "process_caption",
    "scan_dataset",
    "split_tags",
    "square_bucket",
]
