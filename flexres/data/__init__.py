from .dataset import ImageFolderDataset, UnreadableImageError, collate_skipping, load_rgb, split_dir
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiResolutionCrop, normalize_batch

__all__ = [
    "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "MultiResolutionCrop",
    "UnreadableImageError", "collate_skipping", "load_rgb", "normalize_batch", "split_dir",
]
