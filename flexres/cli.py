"""The ``flexres`` command: parses arguments, calls the public functions of ``flexres.api`` and prints.

Every command is a Python function first (``flexres.evaluate``, ``flexres.table``, ...); ``--json`` writes
or prints exactly what that function returns.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import logging
import os
import sys
from pathlib import Path

from . import api
from .errors import ConfigError, FlexresError
from .models.base import SAN_MODES, SCALE_POLICIES
from .nn.switchable_bn import BN_POLICIES

# The largest input side the CLI accepts (documented in the README); from Python any size is accepted and
# checked against memory when it runs.
MAX_RESOLUTION = 2048


def resolution(text: str) -> int:
    """argparse type: a resolution in pixels, 1..MAX_RESOLUTION."""
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not a whole number of pixels") from None
    if not 1 <= r <= MAX_RESOLUTION:
        raise argparse.ArgumentTypeError(
            f"resolution {r} px is outside 1..{MAX_RESOLUTION} px (the CLI's maximum; "
            "call flexres.evaluate from Python for larger inputs)"
        )
    return r


def parse_range(text: str) -> list[float]:
    """'0.25:1.0:0.05' -> [0.25, 0.3, ..., 1.0] (both ends included); '0.5' -> [0.5]."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) == 1:
        return parts
    if len(parts) != 3 or parts[2] <= 0 or parts[0] > parts[1]:
        raise ValueError(f"expected START:STOP:STEP with START <= STOP and STEP > 0, got {text!r}")
    start, stop, step = parts
    n = int(round((stop - start) / step))
    values = [round(start + i * step, 6) for i in range(n + 1)]
    if abs(values[-1] - stop) > 1e-6:
        values.append(stop)
    return values


def widths(text: str) -> list[float]:
    """argparse type: START:STOP:STEP or one width (parse_range)."""
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START:STOP:STEP or one width, e.g. 0.25:1.0:0.05 ({e})"
        ) from None


def _print_json(obj, path: str | None = None) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    if path:
        Path(path).write_text(text)
        print(f"wrote {path}")
    else:
        print(text, end="")


def _train(args: argparse.Namespace) -> int:
    metrics = api.train(
        args.config,
        args.out,
        data=args.data,
        overrides=args.set,
        resume=args.resume,
        stop_after_epochs=args.stop_after_epochs,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved in {metrics['run']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    report = api.evaluate(
        args.runs,
        args.data,
        args.resolutions,
        args.bn,
        scale_policy=args.scale,
        san_mode=args.san_mode,
        width=args.width,
        calibration_images=args.calibration_images,
        batch_size=args.batch_size,
        split=args.split,
        workers=args.workers,
        latency=args.latency,
        save=True,
        progress=True,
    )
    print(api.format_eval_report(report))
    if args.json:
        print()
        _print_json(report, args.json)
    return 0


def _table(args: argparse.Namespace) -> int:
    rows = api.table(
        args.run,
        args.data,
        args.widths,
        args.resolutions,
        scales=args.scales,
        bn_policy=args.bn,
        latency=args.latency,
        calibration_images=args.calibration_images,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=print,
        tree=not args.one_by_one,
    )
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    print((run_dir / "table.md").read_text())
    if args.json:
        _print_json(rows, args.json)
    else:
        print(f"wrote {run_dir / 'table.json'}, table.csv, table.md")
    return 0


def _select(args: argparse.Namespace) -> int:
    row = api.select(args.run, args.max_macs, args.max_latency_ms)
    if args.json:
        _print_json(row)
    else:
        print(api.format_selection(row))
    return 0


def _adapt(args: argparse.Namespace) -> int:
    rep = api.adapt(args.run, args.max_macs, args.data, args.configs, args.label_images, args.epochs, args.resolution)
    a, n = rep["adapt"], rep["nas"]
    print(
        f"Resizable-Adapt under {rep['budget_macs'] / 1e6:.1f} MMACs "
        f"({rep['candidates']} candidate configurations, router trained "
        f"on {rep['train_images']} images):"
    )
    print(
        f"  adapt : top-1 {a['top1']:.2f}%  mean {a['mean_macs'] / 1e6:.1f} MMACs per image "
        f"(max {a['max_macs'] / 1e6:.1f}), "
        f"{a['configs_used']} configurations used; + probe pass {rep['probe_macs'] / 1e6:.1f} MMACs"
    )
    print(f"  NAS   : top-1 {n['top1']:.2f}%  {n['macs'] / 1e6:.1f} MMACs, scales {n['scales']}")
    print(f"  oracle: top-1 {rep['oracle_top1']:.2f}% (the best candidate per image)")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "packed":
        info = api.export(args.run, 0, format="packed", out=args.out, data=args.data)
        print(
            f"wrote {info['path']}: {info['bytes'] / 1e6:.3f} MB "
            f"({info['quantized_weights']:,} weights at {info['bits']} bits, "
            f"fp32 tensors {info['fp32_tensor_bytes'] / 1e6:.3f} MB), resolutions {info['resolutions']}; "
            "max |difference| to "
            f"the trained model {info['parity_max_abs_diff']:.1e}"
        )
        return 0
    if args.resolution is None:
        raise ConfigError("--resolution is required for onnx and torchscript exports (one operating point)")
    info = api.export(
        args.run,
        args.resolution,
        args.width,
        args.scales,
        args.format,
        args.out,
        bn_policy=args.bn,
        scale_policy=args.scale,
        fold_bn=not args.no_fold_bn,
        data=args.data,
        int8=args.int8,
        int8_ranges=args.int8_ranges,
    )
    out = info["path"]
    print(
        f"wrote {', '.join(info['files'])} in {Path(out).parent} and {Path(out).name}.json: "
        f"{info['macs'] / 1e6:.1f} MMACs, "
        f"{info['params'] / 1e6:.3f} M params, "
        f"max |difference| to the adaptive model {info['parity_max_abs_diff']:.1e} on "
        f"{info['parity_images']} real images"
        + (
            f"; int8 keeps the float model's top-1 on {100 * info['int8_top1_agreement']:.0f}% of them"
            if args.int8
            else ""
        )
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    result = api.predict(
        args.model,
        args.images,
        args.resolution,
        max_macs=args.max_macs,
        max_latency_ms=args.max_latency_ms,
        width=args.width,
        bn_policy=args.bn,
        topk=args.topk,
        out=args.out,
    )
    if args.json:
        _print_json(result)
    else:
        print(f"model: {result['model']}")
        for r in result["predictions"]:
            if "error" in r:
                print(f"{r['file']}: error: {r['error']}", file=sys.stderr)
            elif "mask" in r:
                shares = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(r["classes"].items(), key=lambda kv: -kv[1])[:5])
                print(f"{r['file']}: wrote {r['mask']} and {r['overlay']} ({shares})")
            else:
                print(f"{r['file']}: " + ", ".join(f"{t['name']} {t['probability']:.3f}" for t in r["top"]))
    return 1 if any("error" in r for r in result["predictions"]) else 0


def _report(args: argparse.Namespace) -> int:
    index = api.report(args.runs, args.data, args.out, args.resolutions, args.bn, args.latency)
    print(f"wrote {index} (open it in a browser)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    api.serve(
        args.targets,
        args.host,
        args.port,
        target_p95_ms=args.target_p95_ms,
        resolution=args.resolution,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        bn_policy=args.bn,
        inference=args.inference,
        batch_timeout_s=args.batch_timeout_s,
        backend=args.backend,
        int8=args.int8,
        points=args.points,
        threads=args.threads,
        data=args.data,
        max_refusals_per_s=args.max_refusals_per_s,
    )
    return 0


def _shards(args: argparse.Namespace) -> int:
    counts = api.shards(args.data, args.out, args.images_per_shard)
    print(", ".join(f"{split}: {n} shards" for split, n in counts.items()) + f" in {args.out} (use it as data.root)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    report = api.demo(args.out, args.epochs)
    print(api.format_eval_report(report))
    print(f"\nthe run is in {args.out} (`flexres eval {args.out}` evaluates it again)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexres", description="Resolution-adaptive image classifiers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    t.add_argument("--data", help="ImageFolder root with train/ and val/ (overrides data.root)")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. epochs=5"
    )
    t.add_argument(
        "--stop-after-epochs", type=int, help="end this process after N epochs (continue later with --resume)"
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate runs at any list of resolutions")
    e.add_argument("runs", nargs="+", help="run directories or checkpoint files")
    e.add_argument("--data", help="ImageFolder root (its val/ split is used; default: the runs' data.root)")
    e.add_argument("--split", default="val")
    e.add_argument(
        "--resolutions", type=resolution, nargs="+", help="test resolutions (default: the run's eval.resolutions)"
    )
    e.add_argument(
        "--bn", choices=BN_POLICIES, help="BN policy for untrained resolutions (default: the run's eval.bn_policy)"
    )
    e.add_argument(
        "--scale",
        choices=SCALE_POLICIES,
        help="SAN models: weights from eps(T) ('exact', default) or from the "
        "nearest trained resolution's eps ('nearest')",
    )
    e.add_argument(
        "--san-mode",
        choices=list(SAN_MODES),
        help="SAN inference: proxy = --bn nearest --scale nearest; ideal = "
        "--bn calibrate --scale exact; data-free = --bn interpolate --scale exact",
    )
    e.add_argument(
        "--workers", type=int, default=0, help="data-loading processes (for sets too large to cache in memory)"
    )
    e.add_argument("--width", type=float, default=1.0, help="slimmable models: the width to evaluate")
    e.add_argument("--calibration-images", type=int, help="images for --bn calibrate (default eval.calibration_images)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--latency", action="store_true", help="also measure batch-1 latency on this machine")
    e.add_argument("--json", help="also write the report as JSON (what flexres.evaluate returns)")
    e.set_defaults(func=_eval)

    tb = sub.add_parser("table", help="accuracy, MACs, params (and latency) of every operating point")
    tb.add_argument("run")
    tb.add_argument("--data", help="ImageFolder root (default: the run's data.root)")
    tb.add_argument("--widths", type=widths, default="1.0", help="START:STOP:STEP or one value, e.g. 0.25:1.0:0.05")
    tb.add_argument("--resolutions", type=resolution, nargs="+")
    tb.add_argument("--latency", action="store_true", help="also measure batch-1 latency on this machine")
    tb.add_argument(
        "--bn", choices=BN_POLICIES, help="resolution-switchable models: BN policy (default: the run's eval.bn_policy)"
    )
    tb.add_argument(
        "--scales", help="resizable models (Resizable-NAS): 'all' scaling configurations, or N sampled (seeded)"
    )
    tb.add_argument(
        "--one-by-one",
        action="store_true",
        help="resizable models: run each configuration on its own instead of "
        "the prefix tree (same results, slower; for checking)",
    )
    tb.add_argument("--calibration-images", type=int)
    tb.add_argument("--batch-size", type=int, default=256)
    tb.add_argument("--workers", type=int, default=0)
    tb.add_argument("--json", help="also write the rows as JSON (what flexres.table returns)")
    tb.set_defaults(func=_table)

    sl = sub.add_parser("select", help="the best operating point under a budget, from the run's table")
    sl.add_argument("run")
    sel = sl.add_mutually_exclusive_group(required=True)
    sel.add_argument("--max-macs", help="e.g. 150M")
    sel.add_argument("--max-latency-ms", type=float)
    sl.add_argument("--json", action="store_true", help="print the row as JSON (what flexres.select returns)")
    sl.set_defaults(func=_select)

    ad = sub.add_parser(
        "adapt", help="Resizable-Adapt: a per-image choice of scaling configuration under a MACs budget"
    )
    ad.add_argument("run")
    ad.add_argument("--data", help="ImageFolder root (default: the run's data.root)")
    ad.add_argument("--max-macs", required=True, help="no image may cost more, e.g. 25M")
    ad.add_argument("--configs", default="all", help="'all' scaling configurations, or N sampled (seeded)")
    ad.add_argument(
        "--label-images", type=int, default=2000, help="training images labelled with their best configuration"
    )
    ad.add_argument("--epochs", type=int, default=30, help="router training epochs")
    ad.add_argument("--resolution", type=resolution)
    ad.set_defaults(func=_adapt)

    x = sub.add_parser(
        "export",
        help="export one operating point as a static ONNX or TorchScript model, or a quantized "
        "model bit-packed (--format packed, every resolution)",
    )
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("--resolution", type=resolution, help="the operating point (onnx, torchscript)")
    x.add_argument("--width", type=float, default=1.0)
    x.add_argument("--scales", type=float, nargs="+")
    x.add_argument("--format", choices=["onnx", "torchscript", "packed"], default="onnx")
    x.add_argument("--out", help="output file (default RUN/export/<arch>_<res>.onnx|.pt)")
    x.add_argument(
        "--bn",
        choices=BN_POLICIES,
        help="BN policy when the resolution was not trained (default: the run's eval.bn_policy)",
    )
    x.add_argument("--scale", choices=SCALE_POLICIES, help="SAN models: eps(T) ('exact') or the nearest trained eps")
    x.add_argument(
        "--no-fold-bn", action="store_true", help="keep BatchNorm2d layers instead of folding them into the convs"
    )
    x.add_argument(
        "--int8",
        action="store_true",
        help="onnx: quantize to int8 (ONNX Runtime static, QDQ), calibrated on "
        "128 training images at this resolution (the run's data, or --data)",
    )
    x.add_argument(
        "--data",
        help="images for the parity check (default: the bundled sample); with --int8, the data "
        "whose training images calibrate it (default: the run's)",
    )
    x.add_argument(
        "--int8-ranges",
        help="--int8: an activation-range file; an existing one is used instead of "
        "calibrating (one calibration shared by resolutions), a new one receives this resolution's ranges",
    )
    x.set_defaults(func=_export)

    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("model", help="run directory, checkpoint, or an exported .onnx / .pt file")
    pr.add_argument("images", nargs="+")
    budget = pr.add_mutually_exclusive_group()
    budget.add_argument("--resolution", type=resolution)
    budget.add_argument("--max-macs", help="budget in MACs, e.g. 150M")
    budget.add_argument("--max-latency-ms", type=float, help="budget in milliseconds (batch 1, measured here)")
    pr.add_argument("--width", type=float, default=1.0, help="slimmable models: the width to run at with --resolution")
    pr.add_argument(
        "--bn",
        choices=BN_POLICIES,
        help="runs: BN policy at an untrained resolution (default: the run's eval.bn_policy)",
    )
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.add_argument("--out", help="segmentation runs: folder for the mask and overlay PNGs (default ./segmentation)")
    pr.set_defaults(func=_predict)

    rp = sub.add_parser("report", help="plots (accuracy vs cost, train x test heatmap, BN statistics) and an HTML page")
    rp.add_argument("runs", nargs="+")
    rp.add_argument("--data", required=True, help="ImageFolder root to evaluate on (val split)")
    rp.add_argument("--out", required=True, help="output folder")
    rp.add_argument("--resolutions", type=resolution, nargs="+")
    rp.add_argument(
        "--bn", choices=BN_POLICIES, help="BN policy for untrained resolutions (default: each run's eval.bn_policy)"
    )
    rp.add_argument("--latency", action="store_true", help="also plot accuracy vs measured latency")
    rp.set_defaults(func=_report)

    sv = sub.add_parser("serve", help="an HTTP server that picks the operating point per request and under load")
    sv.add_argument("targets", nargs="+", help="a run directory or checkpoint, or exported .onnx / .pt files")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--target-p95-ms", type=float, help="adaptive mode: keep p95 latency under this by lowering the point"
    )
    sv.add_argument("--resolution", type=resolution, help="fixed mode: the resolution for requests that name none")
    sv.add_argument("--max-batch", type=int, default=8, help="largest dynamic batch")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    sv.add_argument("--max-queue", type=int, default=256, help="queued requests beyond this get 503")
    sv.add_argument(
        "--max-refusals-per-s",
        type=float,
        default=1000.0,
        help="503s answered per second; beyond it "
        "refusals wait their turn (at most 0.5 s), which bounds what clients that re-send at once cost; "
        "0: answer every refusal at once",
    )
    sv.add_argument("--max-upload-mb", type=float, default=20.0)
    sv.add_argument("--max-pixels", type=float, default=40e6)
    sv.add_argument("--bn", choices=BN_POLICIES, help="BN policy (default: the query table's, else interpolate)")
    sv.add_argument(
        "--backend",
        choices=("ort", "torch"),
        help="ort: each point an ONNX Runtime session of its static "
        "model (default when onnxruntime is installed); torch: the adaptive model in eager PyTorch",
    )
    sv.add_argument(
        "--int8", action="store_true", help="ort: int8 sessions, calibrated per resolution on training images"
    )
    sv.add_argument(
        "--points",
        nargs="+",
        metavar="POINT",
        help="serve only these points ('224px', '160px w0.5', or a "
        "resolution); default: every trained resolution plus the query table's Pareto points",
    )
    sv.add_argument("--threads", type=int, help="ort: intra-op threads per session (default: the usable cores)")
    sv.add_argument("--data", help="--int8: the data whose training images calibrate it (default: the run's)")
    sv.add_argument(
        "--inference",
        choices=("process", "thread"),
        default="process",
        help="run batches in a child process (default: keeps serving under a flood of requests) or on a thread",
    )
    sv.add_argument(
        "--batch-timeout-s",
        type=float,
        default=30.0,
        help="--inference process: a child that answers no batch within this is killed and replaced "
        "(the batch gets 503); its start-up after a restart does not count",
    )
    sv.set_defaults(func=_serve)

    sh = sub.add_parser("shards", help="pack an ImageFolder root's splits into tar shards (slow file systems)")
    sh.add_argument("data", help="an ImageFolder root: <data>/<split>/<class>/<image>")
    sh.add_argument("out", help="the sharded root to write: <out>/<split>/shard-000000.tar ...")
    sh.add_argument("--images-per-shard", type=int, default=1000)
    sh.set_defaults(func=_shards)

    d = sub.add_parser("demo", help="train and evaluate a small RS-Net on the bundled sample images (CPU, minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=60)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _plain_notes()
    try:
        return args.func(args)
    except Exception as e:
        if not user_error(e):
            raise  # a bug: its traceback is what a report needs
        print(f"flexres {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


# A missing or existing file the user named: its message names the path, whoever raised it.
_FILE_ERRORS = (FileNotFoundError, FileExistsError)
_PACKAGE = Path(__file__).resolve().parent


def user_error(e: BaseException) -> bool:
    """Whether ``e`` is a mistake the user can fix, printed as one line; anything else is a bug.

    flexres's error types are (FlexresError and the few defined elsewhere), as are missing or existing files. So is a
    ValueError or LookupError a flexres module raises itself with a ``raise`` statement and a message for the user
    (most modules still raise those, not FlexresError), but not one that Python or a library raises inside flexres code:
    a KeyError from ``d[key]``, a ValueError from ``int(text)`` or from inside torch keep their traceback."""
    if isinstance(e, (FlexresError, *_FILE_ERRORS)):
        return True
    return isinstance(e, (ValueError, LookupError)) and _raised_by_flexres(e)


def _raised_by_flexres(e: BaseException) -> bool:
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename)
    return _PACKAGE in path.parents and tb.tb_lineno in _raise_lines(str(path))


@functools.cache
def _raise_lines(path: str) -> frozenset[int]:
    """The lines of every ``raise`` statement in a source file."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    return frozenset(
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Raise)
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    )


def _message(e: BaseException) -> str:
    # str() of a KeyError is the repr of its message (quotes and escaped newlines): print the message itself
    return e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)


def _plain_notes() -> None:
    """Notes (flexres.notes) as bare lines on stderr, not as Python warnings with source locations."""
    logger = logging.getLogger("flexres")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())


class _StderrLines(logging.Handler):
    """Each record as its bare message on the current sys.stderr (looked up per record, so redirection works)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
