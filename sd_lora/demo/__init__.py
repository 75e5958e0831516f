"""The demo: a toy world, a small SD base model pretrained on it, the zkchar dataset and its evaluation."""

from .defaults import BASE_MODEL_DIR

__all__ = ["BASE_MODEL_DIR"]
