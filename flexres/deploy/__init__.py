from .export import StaticClassifier, export, to_static
from .latency import measure_latency

__all__ = ["StaticClassifier", "export", "measure_latency", "to_static"]
