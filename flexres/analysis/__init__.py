from .flops import count_macs, count_params
from .latency import measure_latency, time_call
from .san import meta_weight_ratios

__all__ = ["count_macs", "count_params", "measure_latency", "meta_weight_ratios", "time_call"]
