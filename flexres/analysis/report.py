"""``flexres report``: accuracy-vs-cost curves, the train x test heatmap and BN statistics, as PNGs + one HTML page."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..models import AdaptiveModel  # noqa: E402


def metric_of(report: dict[str, Any]) -> tuple[str, str]:
    """The report's headline metric: top-1 for classifiers, mean IoU for segmenters."""
    return ("miou", "mean IoU (%)") if report.get("task") == "segmentation" else ("top1", "top-1 accuracy (%)")


def plot_accuracy_vs_cost(report: dict[str, Any], out: Path, key: str = "macs") -> Path:
    metric, axis_label = metric_of(report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in report["runs"].items():
        pts = sorted((v[key], v[metric], int(r)) for r, v in run["results"].items() if v.get(key) is not None)
        if not pts:
            continue
        xs = [p[0] / 1e6 if key == "macs" else p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
        trained = [(x, p[1]) for x, p in zip(xs, pts) if p[2] in run["train_resolutions"]]
        if trained:
            ax.scatter(*zip(*trained), s=80, facecolors="none", edgecolors="black", zorder=3)
    ax.set_xlabel("MMACs per image" if key == "macs" else "latency (ms, batch 1, this machine)")
    ax.set_ylabel(axis_label)
    ax.set_title(
        f"accuracy vs {'MACs' if key == 'macs' else 'latency'} (circled: trained resolutions; BN {report['bn_policy']})"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"accuracy_vs_{key}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(report: dict[str, Any], out: Path) -> Path:
    labels = list(report["runs"])
    res = sorted({int(r) for run in report["runs"].values() for r in run["results"]}, reverse=True)
    metric, axis_label = metric_of(report)
    grid = [[report["runs"][lb]["results"].get(str(r), {}).get(metric, float("nan")) for r in res] for lb in labels]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(res), 1.2 + 0.5 * len(labels)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(res)), [str(r) for r in res])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("test resolution")
    mean = sum(map(sum, grid)) / max(1, sum(map(len, grid)))
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            bold = res[j] in report["runs"][labels[i]]["train_resolutions"]
            ax.text(
                j,
                i,
                f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v < mean else "black",
                fontweight="bold" if bold else "normal",
            )
    fig.colorbar(im, ax=ax, label=axis_label)
    ax.set_title(f"train x test {metric} (bold: trained resolution)")
    fig.tight_layout()
    path = out / "train_test_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bn_statistics(model: AdaptiveModel) -> dict[int, dict[str, list[float]]]:
    """Per trained resolution, per BN layer: the mean of gamma, beta, running mean and running var."""
    out: dict[int, dict[str, list[float]]] = {
        r: {"gamma": [], "beta": [], "mean": [], "var": []} for r in model.train_resolutions
    }
    for bn in model.switchable_bns():
        for r, b in zip(bn.resolutions, bn.bns):
            for key, t in (("gamma", b.weight), ("beta", b.bias), ("mean", b.running_mean), ("var", b.running_var)):
                out[r][key].append(float(t.detach().float().mean()))
    return out


def plot_bn_statistics(model: AdaptiveModel, label: str, out: Path) -> Path:
    stats = bn_statistics(model)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    cmap = plt.get_cmap("plasma")
    for k, (key, ax) in enumerate(zip(("gamma", "beta", "mean", "var"), axes.flat)):
        for i, (r, s) in enumerate(sorted(stats.items(), reverse=True)):
            ax.plot(s[key], label=f"{r} px", color=cmap(i / max(1, len(stats) - 1) * 0.85))
        ax.set_title(
            {
                "gamma": "mean of gamma",
                "beta": "mean of beta",
                "mean": "mean of running mean",
                "var": "mean of running var",
            }[key]
        )
        ax.grid(alpha=0.3)
        if k >= 2:
            ax.set_xlabel("BN layer (network order)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{label}: BN statistics per training resolution (RS-Nets Fig. 6, SAN Fig. 1)")
    fig.tight_layout()
    path = out / f"bn_statistics_{label}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_segmentation_examples(
    model: AdaptiveModel,
    meta: dict[str, Any],
    image: str | Path,
    resolutions: list[int],
    label: str,
    out: Path,
    segment_files: Callable[..., list[dict[str, Any]]],
) -> Path:
    """One image segmented at every resolution, side by side with the image (masks at the image's own size).
    ``segment_files``: flexres.deploy.predict's (deploy sits above analysis, so the caller passes it in)."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        masks = [(r, segment_files(model, meta, [str(image)], r, Path(tmp) / str(r))[0]) for r in resolutions]
        panels = [("image", Image.open(image).convert("RGB"))] + [
            (f"{r} px", Image.open(m["mask"]).convert("RGB")) for r, m in masks
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.4))
        for ax, (title, im) in zip(axes, panels):
            ax.imshow(im)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{label}: {Path(image).name} at every resolution (short side)", fontsize=10)
    fig.tight_layout()
    path = out / f"segmentation_{label}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    report: dict[str, Any],
    models: dict[str, AdaptiveModel],
    out: str | Path,
    extra_figures: list[tuple[str, Path]] | None = None,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric, axis_label = metric_of(report)
    name = axis_label.split(" (")[0]  # "mean IoU", "top-1": capitalise the first letter only, keep "IoU"
    figures = [(f"{name[:1].upper()}{name[1:]} vs MACs", plot_accuracy_vs_cost(report, out, "macs"))]
    if all(v.get("latency_ms") is not None for run in report["runs"].values() for v in run["results"].values()):
        figures.append(("Accuracy vs latency", plot_accuracy_vs_cost(report, out, "latency_ms")))
    figures.append(("Train x test accuracy", plot_heatmap(report, out)))
    figures += extra_figures or []
    for label, model in models.items():
        if len(model.train_resolutions) > 1 and model.width_range is None:
            figures.append((f"BN statistics: {label}", plot_bn_statistics(model, label, out)))
    res = sorted({int(r) for run in report["runs"].values() for r in run["results"]}, reverse=True)

    def cell(run: dict[str, Any], r: int) -> str:
        v = run["results"].get(str(r))
        return f"<td>{v[metric]:.1f}</td>" if v else "<td></td>"

    rows = "".join(
        f"<tr><td>{html.escape(lb)}</td><td>{', '.join(map(str, run['train_resolutions']))}</td>"
        + "".join(cell(run, r) for r in res)
        + "</tr>"
        for lb, run in report["runs"].items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>flexres report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} \
img{{max-width:100%;border:1px solid #ddd}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>flexres report</h1><p>data: {html.escape(str(report["data"]))}; \
BN policy for unseen resolutions: {html.escape(report["bn_policy"])}</p>
<h2>{html.escape(axis_label)}</h2>\
<table><tr><th>run</th><th>trained at</th>{"".join(f"<th>{r}</th>" for r in res)}</tr>{rows}</table>
{"".join(f'<h2>{html.escape(t)}</h2><img src="{p.name}" alt="{html.escape(t)}">' for t, p in figures)}
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index


__all__ = ["bn_statistics", "plot_segmentation_examples", "write_report"]
