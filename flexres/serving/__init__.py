"""flexres serve: one model process that switches operating point per request and under load (see README, Serving)."""

from .controller import AdaptiveController, Decision, LatencyModel
from .engine import Constraint, Overloaded, RequestError, ServeOptions, ServingEngine
from .points import PointSet, ServingPoint, load_points

__all__ = [
    "AdaptiveController",
    "Constraint",
    "Decision",
    "LatencyModel",
    "Overloaded",
    "PointSet",
    "RequestError",
    "ServeOptions",
    "ServingEngine",
    "ServingPoint",
    "create_app",
    "load_points",
]


def create_app(*args, **kwargs):
    """See :func:`flexres.serving.app.create_app` (imported on use: FastAPI is only needed to serve)."""
    from .app import create_app as build

    return build(*args, **kwargs)
