from .dataset import (
    ImageFolderDataset,
    KeyedSampler,
    SubsetView,
    UnreadableImageError,
    collate_skipping,
    load_rgb,
    read_class_names,
    sample_data_dir,
    sample_segmentation_dir,
    split_dir,
)
from .shards import write_shards
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiResolutionCrop, normalize_batch, resize_batch

__all__ = [
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "MultiResolutionCrop",
    "SubsetView",
    "KeyedSampler",
    "UnreadableImageError",
    "collate_skipping",
    "load_rgb",
    "normalize_batch",
    "read_class_names",
    "resize_batch",
    "sample_data_dir",
    "sample_segmentation_dir",
    "split_dir",
    "write_shards",
]
