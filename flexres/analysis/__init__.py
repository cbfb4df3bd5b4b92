from .flops import count_macs, count_params
from .san import meta_weight_ratios

__all__ = ["count_macs", "count_params", "meta_weight_ratios"]
