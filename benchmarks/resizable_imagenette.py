"""Resizable networks on the Imagenette protocol (resizable_resnet18 x0.25 at the config's resolution, 160 px,
where every factor of L = (0.45, 0.65, 0.85, 1.0) gives a distinct map at every stage).

(a) sub-networks of one fair-sampling run vs networks trained alone at the same configuration (Table 1);
(b) fair vs random sampling over the evaluated configurations (all 256, or a seeded sample) (Table 11): "random" draws
    |L| configurations per step (equal compute per step), "random-single" is the paper's baseline (App. D.3), one
    configuration per step for |L| times the epochs;
(c) Resizable-Aug (fair sampling for 2/3 of the epochs, then all 1.0) vs plain training (Table 2);
(d) Resizable-Adapt vs the best single configuration (NAS) at equal budgets (Fig. 3d).

    python benchmarks/resizable_imagenette.py [--data DIR] [--out runs/bench_resizable] [--epochs 20]

Every configuration of a run is scored once per image and kept (scores_*.pt), so the report can be
rendered again for free; --train-only and --score-only spread the work over processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path, train_once

from flexres.analysis import count_macs
from flexres.analysis.adapt import Candidates, Scores, compare_adapt_nas, score_candidates
from flexres.analysis.table import scale_configurations
from flexres.data import ImageFolderDataset, SubsetView
from flexres.engine.checkpoint import load_checkpoint
from flexres.engine.config import load_config
from flexres.engine.evaluate import evaluate, markdown_table
from flexres.operating_point import OperatingPoint

ROOT = Path(__file__).resolve().parents[1]
FIXED = [(1.0,) * 4, (0.85,) * 4, (0.65,) * 4, (0.45,) * 4]


def fixed_label(scales: tuple[float, ...]) -> str:
    return "fixed-" + "-".join(f"{f:g}" for f in scales)


def base_config(data: Path, epochs: int, batch: int | None) -> dict:
    sets = [f"epochs={epochs}", "progress=false"] + ([f"batch_size={batch}"] if batch else [])
    cfg = load_config(ROOT / "configs" / "imagenette_resizable_r18.yaml", sets)
    cfg["data"]["root"] = str(data)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=data_path, default=IMAGENETTE)
    p.add_argument("--out", type=Path, default=Path("runs/bench_resizable"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int)
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run (a seed repeat of the protocol)")
    p.add_argument("--configs", default="all", help="configurations in the tables: 'all' (256) or N sampled")
    p.add_argument(
        "--random-configs", help="configurations for the random-sampling run's table (default: as --configs)"
    )
    p.add_argument("--label-images", type=int, default=2000)
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="runs to leave out (e.g. fixed-0.65-0.65-0.65-0.65): not trained, not in the report",
    )
    p.add_argument(
        "--score-only",
        action="store_true",
        help="only run every configuration of the finished fair and random runs (kept for the report) and exit",
    )
    p.add_argument(
        "--train-only",
        nargs="+",
        metavar="LABEL",
        help="only train these runs (fair, random, aug, fixed-1-1-1-1, ...) and exit: to spread them over processes",
    )
    args = p.parse_args()
    runs = {
        "fair": {"sampling": "fair"},
        "random": {"sampling": "random"},
        "random-single": {"sampling": "random", "configs_per_step": 1},
        "aug": {"sampling": "fair", "target_scales": [1.0] * 4, "finetune_from": 2 / 3},
        **{fixed_label(sc): {"sampling": "fixed", "target_scales": list(sc)} for sc in FIXED},
    }
    runs = {label: kw for label, kw in runs.items() if label not in args.skip}
    fixed = [sc for sc in FIXED if fixed_label(sc) in runs]
    if args.train_only:
        unknown = set(args.train_only) - set(runs)
        if unknown:
            raise SystemExit(f"unknown run(s) {sorted(unknown)}; known: {list(runs)}")
        runs = {label: runs[label] for label in args.train_only}
    walls = {}
    for label, kwargs in ({} if args.score_only else runs).items():
        cfg = base_config(args.data, args.epochs, args.batch)
        cfg["method"]["kwargs"] = {**cfg["method"]["kwargs"], **kwargs}
        epochs = args.epochs * (len(FIXED) if label == "random-single" else 1)  # App. D.3: |L| times the epochs
        cfg["train"]["epochs"] = epochs
        cfg["train"]["seed"] = args.seed
        walls[label] = train_once(label, cfg, args.out / label, epochs)
    if args.train_only:
        return

    res = base_config(args.data, args.epochs, args.batch)["method"]["resolutions"][0]
    val = ImageFolderDataset(args.data / "val", cache="auto", progress=False)
    train_ds = ImageFolderDataset(args.data / "train", progress=False)
    pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0))[: args.label_images].tolist()
    fair_model, _ = load_checkpoint(args.out / "fair")
    random_models = {k: load_checkpoint(args.out / k)[0] for k in ("random", "random-single") if k in runs}
    macs: dict[tuple[float, ...], int] = {}  # MACs follow the configuration, not the weights: counted once

    def candidates(spec: str) -> Candidates:
        scales = scale_configurations(fair_model.scale_factors, fair_model.num_stages, spec)
        scales += [sc for sc in FIXED if sc not in scales]  # (a) needs the four uniform configurations
        for sc in scales:
            if sc not in macs:
                macs[sc] = count_macs(fair_model, OperatingPoint(res, scales=sc))
        return Candidates(scales, [macs[sc] for sc in scales])

    # Every configuration runs once per image and the results are kept: the query tables (b), the labels
    # and the validation scores of every Adapt budget (d) are all read from these matrices.
    cands, random_cands = candidates(args.configs), candidates(args.random_configs or args.configs)
    fair_scores = score_all(fair_model, args.out / "fair", cands, val, args.out / "scores_fair_val.pt", res)
    train_scores = score_all(
        fair_model, args.out / "fair", cands, SubsetView(train_ds, pick), args.out / "scores_fair_train.pt", res
    )
    scored = {"fair": (cands, fair_scores)}
    for k, model in random_models.items():
        scored[k] = (
            random_cands,
            score_all(model, args.out / k, random_cands, val, args.out / f"scores_{k}_val.pt", res),
        )
    if args.score_only:
        return
    tables = {
        k: [
            {"scales": list(sc), "top1": 100 * float(sv.correct[:, i].float().mean()), "macs": c.macs[i]}
            for i, sc in enumerate(c.scales)
        ]
        for k, (c, sv) in scored.items()
    }
    (args.out / "tables.json").write_text(json.dumps(tables, indent=1))

    per_fixed = {}  # each network trained alone, evaluated at its own configuration
    for sc in fixed:
        model, _ = load_checkpoint(args.out / fixed_label(sc))
        per_fixed[sc] = evaluate(model, val, [res], scales=sc)[res]["top1"]
    aug_top1 = (
        evaluate(load_checkpoint(args.out / "aug")[0], val, [res], scales=(1.0,) * 4)[res]["top1"]
        if "aug" in runs
        else None
    )

    def at(table, sc, key="top1"):
        return next(r[key] for r in table if tuple(r["scales"]) == sc)

    lines = [
        f"Date {date.today()}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.epochs} epochs; "
        "wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()),
        "",
        "(a) Sub-networks of the fair-sampling run vs networks trained alone at that configuration (top-1 %):",
        "",
        markdown_table(
            ["configuration", "MMACs", "trained alone", "resizable (fair) sub-network", "gain"],
            [
                [
                    "-".join(f"{f:g}" for f in sc),
                    f"{at(tables['fair'], sc, 'macs') / 1e6:.1f}",
                    f"{per_fixed[sc]:.1f}",
                    f"{at(tables['fair'], sc):.1f}",
                    f"{at(tables['fair'], sc) - per_fixed[sc]:+.1f}",
                ]
                for sc in fixed
            ],
        ),
        "",
    ]
    summary = []
    for k, t in tables.items():
        accs = [r["top1"] for r in t]
        summary.append([k, str(len(accs)), f"{statistics.mean(accs):.2f}", f"{min(accs):.1f}", f"{max(accs):.1f}"])
    fair_at = {tuple(r["scales"]): r["top1"] for r in tables["fair"]}
    lines += [
        "(b) Fair vs random sampling, over the evaluated configurations:",
        "",
        markdown_table(["sampling", "configurations", "mean top-1", "min", "max"], summary),
        "",
    ]
    for k in random_models:
        both = [(fair_at[tuple(r["scales"])], r["top1"]) for r in tables[k] if tuple(r["scales"]) in fair_at]
        lines += [
            f"On the {len(both)} configurations fair and {k} both hold: "
            f"fair above {k} at {sum(f > r for f, r in both)}; "
            f"mean top-1 fair {statistics.mean(f for f, _ in both):.2f}, "
            f"{k} {statistics.mean(r for _, r in both):.2f}.",
            "",
        ]
    if aug_top1 is not None:
        lines += [
            f"(c) Resizable-Aug at all 1.0: {aug_top1:.1f}% vs plain training "
            f"(fixed all 1.0): {per_fixed[(1.0,) * 4]:.1f}%.",
            "",
        ]

    ordered = sorted(cands.macs)
    adapt_rows = []
    for q in (0.25, 0.5, 0.75):
        budget = ordered[int(q * (len(ordered) - 1))]
        sub, cols = cands.within(budget)
        rep = compare_adapt_nas(sub, train_scores.subset(cols), fair_scores.subset(cols))
        adapt_rows.append(
            [
                f"{budget / 1e6:.1f}",
                str(len(cols)),
                f"{rep['adapt']['top1']:.1f}",
                f"{rep['adapt']['mean_macs'] / 1e6:.1f}",
                f"{(rep['adapt']['mean_macs'] + rep['probe_macs']) / 1e6:.1f}",
                f"{rep['nas']['top1']:.1f}",
                f"{rep['nas']['macs'] / 1e6:.1f}",
                f"{rep['oracle_top1']:.1f}",
            ]
        )
    lines += [
        "(d) Resizable-Adapt vs NAS (best single configuration under the same budget, "
        "picked on the labelled training images):",
        "",
        markdown_table(
            [
                "budget (MMACs)",
                "candidates",
                "Adapt top-1",
                "Adapt mean MMACs",
                "+ probe pass",
                "NAS top-1",
                "NAS MMACs",
                "oracle",
            ],
            adapt_rows,
        ),
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "date": str(date.today()),
        "epochs": args.epochs,
        "resolution": res,
        "walls": walls,
        "trained_alone": {fixed_label(sc): per_fixed[sc] for sc in fixed},
        "fair_at_uniform": {fixed_label(sc): at(tables["fair"], sc) for sc in fixed},
        "sampling": {
            k: {"configurations": len(t), "mean_top1": statistics.mean(r["top1"] for r in t)} for k, t in tables.items()
        },
        "aug_top1": aug_top1,
        "adapt": [
            dict(
                zip(
                    [
                        "budget_mmacs",
                        "candidates",
                        "adapt_top1",
                        "adapt_mmacs",
                        "with_probe_mmacs",
                        "nas_top1",
                        "nas_mmacs",
                        "oracle_top1",
                    ],
                    row,
                )
            )
            for row in adapt_rows
        ],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def score_all(model, run: Path, cands: Candidates, dataset, cache: Path, resolution: int) -> Scores:
    """Every configuration of ``model`` (trained in ``run``) on ``dataset`` at ``resolution``, kept in ``cache``:
    rendering the report again costs nothing."""
    configs = [list(sc) for sc in cands.scales]
    if cache.exists() and cache.stat().st_mtime > (run / "checkpoint.safetensors").stat().st_mtime:
        saved = torch.load(cache)
        if saved["configs"] == configs and len(saved["correct"]) == len(dataset):
            return Scores(saved["correct"], saved["prob"], saved["features"])
    scores = score_candidates(model, dataset, resolution, cands)
    torch.save({"configs": configs, **vars(scores)}, cache)
    return scores


if __name__ == "__main__":
    main()
