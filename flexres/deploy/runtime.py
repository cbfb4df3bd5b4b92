"""ONNX Runtime for static operating points: one-file export, sessions with stated threads, int8 per resolution.

int8 is ONNX Runtime's static quantization in the QDQ format: the activation ranges come from calibration images run
through the float model. A switchable network sees different activation statistics at each resolution (the reason
RS-Nets keeps private BNs), so each resolution gets its own calibration, on training images at that resolution; one
calibration shared by all resolutions is the baseline it is compared with (BENCHMARKS.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MissingFileError

TWO_GB = 2 * 1024**3  # protobuf's limit: a larger model's weights must live in an external data file


def export_onnx(static: nn.Module, example: Tensor, out: Path) -> list[Path]:
    """``static`` as ONNX at ``out``: one self-contained file when the model is under 2 GB (the format's limit), else
    the graph plus one external data file. Returns every file written."""
    weights = sum(p.numel() * p.element_size() for p in static.state_dict().values())
    external = weights >= TWO_GB
    torch.onnx.export(
        static,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        verbose=False,
        external_data=external,
    )
    return [out] + sorted(p for p in out.parent.glob(out.name + "*") if p != out and not p.name.endswith(".json"))


def external_data_files(path: Path) -> list[str]:
    """The external data files an ONNX model names (relative to its folder)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    return sorted(names)


def default_threads() -> int:
    """Threads for one inference session: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path``: ``threads`` intra-op threads (default: the usable cores), one inter-op
    thread and sequential execution (a CNN's graph is a chain: parallel branches would only contend for the same
    cores). A model whose external data file is missing is refused naming that file."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ONNX model {path} does not exist")
    missing = [name for name in external_data_files(path) if not (path.parent / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{path} keeps its weights in {', '.join(missing)}, which is not beside it in {path.parent}: "
            "copy it there (an ONNX model over 2 GB is a graph file plus its data file)"
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def session_runner(session) -> Callable[[Tensor], Tensor]:
    """A normalised N x 3 x R x R batch -> logits, through ``session``."""
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(
            session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        )

    return run


def quantize_int8(
    fp32: Path, out: Path, calibration: Iterator[Tensor] | list[Tensor] | None = None, ranges: Path | None = None
) -> Path:
    """``fp32`` quantized to int8 (QDQ: weights per channel, activations per tensor, ranges by min/max on the
    ``calibration`` batches of normalised images, which must be at the model's own resolution).

    ``ranges``: a calibration cache (ONNX Runtime's JSON of activation ranges). When the file exists its ranges are used
    and no images are needed (a calibration shared by several resolutions: ``merge_ranges``); when it does not, the
    ranges measured on ``calibration`` are written there."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [np.ascontiguousarray(b.numpy(), dtype=np.float32) for b in calibration or []]
    if not batches and not (ranges is not None and Path(ranges).is_file()):
        raise ValueError("int8 calibration needs at least one batch of images, or an existing ranges file")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {"image": b}

    cache = {} if ranges is None else {"calibration_cache_path": str(ranges)}  # onnxruntime >= 1.24 reads and writes it
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # shape inference + fusions int8 needs
        quantize_static(
            str(prepared),
            str(out),
            Reader() if batches else None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            **cache,
        )
    return out


def merge_ranges(caches: list[Path], out: Path) -> Path:
    """One calibration shared by several resolutions: every activation's range is the union (lowest of the lows,
    highest of the highs) of its ranges in ``caches``, which is what min/max calibration on all their images at once
    gives. The caches must name the same tensors (the same network at different resolutions)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, load_tensors_data, save_tensors_data

    loaded = [(Path(c), load_tensors_data(c)) for c in caches]
    if not loaded:
        raise ValueError("merge_ranges needs at least one calibration cache")
    names = set(loaded[0][1].data)
    for path, data in loaded[1:]:
        if set(data.data) != names:
            odd = sorted(names ^ set(data.data))[:3]
            raise ValueError(f"{path} holds other activations than {loaded[0][0]} (e.g. {odd}): not the same network")
    merged = {}
    for name in sorted(names):
        lows = [d.data[name].range_value[0] for _, d in loaded]
        highs = [d.data[name].range_value[1] for _, d in loaded]
        merged[name] = TensorData(
            lowest=np.minimum.reduce(lows).astype(np.float32), highest=np.maximum.reduce(highs).astype(np.float32)
        )
    save_tensors_data(TensorsData(loaded[0][1].calibration_method, merged), out)
    return out
