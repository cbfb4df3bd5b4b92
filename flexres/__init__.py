"""flexres: resolution-adaptive image classifiers (RS-Nets, SAN, Resizable networks, MutualNet)."""

__version__ = "0.1.0"

from .engine import load_checkpoint  # noqa: E402
from .models import AdaptiveModel, create_model, list_models  # noqa: E402
from .nn import SwitchableBatchNorm2d, calibrate_bn  # noqa: E402
from .operating_point import OperatingPoint  # noqa: E402

__all__ = ["AdaptiveModel", "OperatingPoint", "SwitchableBatchNorm2d", "__version__", "calibrate_bn", "create_model",
           "list_models", "load_checkpoint"]
