"""flexres: resolution-adaptive image classifiers (RS-Nets, SAN, Resizable networks, MutualNet).

A notebook needs only this namespace: the workflow functions (``train``, ``evaluate``, ``table``,
``select``, ``export``, ``predict``, ``report``, ``adapt``, ``demo``: one per CLI command, returning what
the CLI prints as JSON), models (``create_model``, ``load_checkpoint``, ``Run.open``, ``OperatingPoint``) and the
tools around them (``calibrate_bn``, ``count_macs``, ``to_static``...). Layers are in ``flexres.nn``.
"""

from .analysis import count_macs, count_params  # noqa: E402
from .api import (  # noqa: E402
    adapt,
    demo,
    evaluate,
    export,
    format_eval_report,
    predict,
    report,
    select,
    serve,
    shards,
    table,
    train,
)
from .data import ImageFolderDataset, sample_data_dir  # noqa: E402
from .deploy import measure_latency, to_static  # noqa: E402
from .engine import load_checkpoint, load_config, make_config  # noqa: E402
from .engine.run import Preprocessing, Run, RunInfo  # noqa: E402
from .models import AdaptiveModel, create_model, list_models, make_switchable  # noqa: E402
from .nn import SwitchableBatchNorm2d, calibrate_bn  # noqa: E402
from .operating_point import OperatingPoint  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "AdaptiveModel",
    "ImageFolderDataset",
    "OperatingPoint",
    "Preprocessing",
    "Run",
    "RunInfo",
    "SwitchableBatchNorm2d",
    "__version__",
    "adapt",
    "calibrate_bn",
    "count_macs",
    "count_params",
    "create_model",
    "demo",
    "evaluate",
    "export",
    "format_eval_report",
    "list_models",
    "load_checkpoint",
    "load_config",
    "make_config",
    "make_switchable",
    "measure_latency",
    "predict",
    "report",
    "sample_data_dir",
    "select",
    "serve",
    "shards",
    "table",
    "to_static",
    "train",
]
