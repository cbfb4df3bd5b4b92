from .checkpoint import CheckpointMismatchError, load_checkpoint, load_into, save_checkpoint
from .config import ConfigError, load_config, make_config
from .evaluate import accuracy_matrix, calibrate, evaluate, hit_miss_matrix
from .trainer import train

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "accuracy_matrix",
    "calibrate",
    "evaluate",
    "hit_miss_matrix",
    "load_checkpoint",
    "load_config",
    "load_into",
    "make_config",
    "save_checkpoint",
    "train",
]
