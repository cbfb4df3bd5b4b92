from .export import StaticClassifier, export, to_static

__all__ = ["StaticClassifier", "export", "to_static"]
