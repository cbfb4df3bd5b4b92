from .flops import count_macs, count_params
from .latency import time_call
from .san import meta_weight_ratios

__all__ = ["count_macs", "count_params", "meta_weight_ratios", "time_call"]
