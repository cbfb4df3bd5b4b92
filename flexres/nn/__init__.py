from .calibration import calibrate_bn
from .switchable_bn import BN_POLICIES, BNChoice, SwitchableBatchNorm2d, plan_bn

__all__ = ["BN_POLICIES", "BNChoice", "SwitchableBatchNorm2d", "calibrate_bn", "plan_bn"]
