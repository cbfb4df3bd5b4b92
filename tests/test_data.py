from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from flexres.data import (
    EvalTransform,
    ImageFolderDataset,
    MultiResolutionCrop,
    UnreadableImageError,
    collate_skipping,
    load_rgb,
    sample_data_dir,
)
from flexres.data import load_rgb as _load_rgb
from flexres.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch, resize_batch


def test_one_crop_feeds_every_resolution():
    """Every output of one sample is the same crop at another size: downsized to a common size they agree,
    while two different samples of the transform do not."""
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 200, 200, generator=g) * 255).to(torch.uint8)
    img = F.avg_pool2d(img[None].float(), 9, 1, 4)[0].to(torch.uint8)  # smooth, so resizing is stable
    t = MultiResolutionCrop([112, 96, 64, 48])
    torch.manual_seed(3)
    outs = t(img)
    assert [o.shape[-1] for o in outs] == [112, 96, 64, 48] and all(o.dtype == torch.uint8 for o in outs)
    common = [F.interpolate(o[None].float(), size=24, mode="area")[0] for o in outs]
    for c in common[1:]:
        assert (c - common[0]).abs().mean() < 2.0
    diffs = []
    for seed in range(4):
        torch.manual_seed(100 + seed)
        other = F.interpolate(t(img)[0][None].float(), size=24, mode="area")[0]
        diffs.append(float((other - common[0]).abs().mean()))
    assert max(diffs) > 5.0  # a fresh crop really differs


def test_resizing_on_the_device_gives_the_cpu_paths_crops_within_interpolation_tolerance():
    """The same crop (same random draws), resized to every resolution by each worker on the CPU, or to the largest by
    the worker and to the rest by resize_batch on the device: equal up to resampling once more and uint8 rounding."""
    files = sorted((sample_data_dir() / "train").rglob("*.JPEG"))[:6]
    resolutions = [224, 192, 160, 128, 96]
    cpu_t, dev_t = MultiResolutionCrop(resolutions), MultiResolutionCrop(resolutions, on_device=True)
    for k, f in enumerate(files):
        img = _load_rgb(str(f))
        torch.manual_seed(k)
        on_cpu = cpu_t(img)
        torch.manual_seed(k)
        (big,) = dev_t(img)
        assert big.shape[-1] == 224 and torch.equal(big, on_cpu[0])  # the largest is the CPU path's own
        on_dev = resize_batch(big[None], resolutions)
        for r, a, b in zip(resolutions, on_cpu, on_dev):
            assert b.shape == (1, 3, r, r) and b.dtype == torch.float32
            diff = (a.float() - b[0]).abs()
            # the yardstick: how much two reasonable resizes of the same crop differ (bicubic vs bilinear)
            cubic = TF.resize(big, [r, r], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
            yardstick = (cubic - TF.resize(big, [r, r], antialias=True).float()).abs().mean()
            assert diff.mean() <= 2 * yardstick + 0.25, (f.name, r, float(diff.mean()), float(yardstick))
            assert torch.quantile(diff.flatten(), 0.99) < 16


def test_eval_transform_resizes_then_center_crops():
    img = torch.zeros(3, 224, 300, dtype=torch.uint8)
    t = EvalTransform(112)
    assert t.resize_to == 128
    assert t(img).shape == (3, 112, 112)
    # 0.875 crop: a 224 image at resolution 224 is resized to 256 then center-cropped
    img = torch.arange(224, dtype=torch.float32).repeat(3, 224, 1).to(torch.uint8)
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224)
    assert out[0, 0, 0] > 10  # the left border was cropped away


def test_normalize_batch_uses_imagenet_mean_and_std():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize_batch(x)
    for c in range(3):
        assert torch.allclose(y[0, c], torch.tensor((1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_grayscale_and_rgba_load_as_rgb(tmp_path):
    Image.new("L", (10, 8), 77).save(tmp_path / "g.png")
    Image.new("RGBA", (10, 8), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("L", (10, 8), 99).save(tmp_path / "g.jpg")
    for name in ("g.png", "a.png", "g.jpg"):
        x = load_rgb(str(tmp_path / name))
        assert x.shape == (3, 8, 10) and x.dtype == torch.uint8
    assert load_rgb(str(tmp_path / "a.png"))[:, 0, 0].tolist() == [10, 20, 30]


def _folder_with_corrupt_file(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return bad


def test_corrupt_image_stops_with_an_error_naming_the_file(tmp_path):
    bad = _folder_with_corrupt_file(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        ds[idx]
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        ImageFolderDataset(tmp_path, cache=True, progress=False)


def test_skip_unreadable_drops_and_reports(tmp_path):
    bad = _folder_with_corrupt_file(tmp_path)
    ds = ImageFolderDataset(tmp_path, transform=MultiResolutionCrop([8]), skip_unreadable=True)
    batch = collate_skipping([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == [str(bad)]
    assert batch["inputs"][0].shape == (6, 3, 8, 8) and batch["labels"].shape == (6,)
    cached = ImageFolderDataset(tmp_path, cache=True, skip_unreadable=True, progress=False)
    assert cached.unreadable == [str(bad)]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")


def test_a_run_resizes_on_the_device_when_asked(small_data, tmp_path):
    import flexres

    cfg = {
        "model": {"name": "resnet18", "width_mult": 0.25},
        "method": {"name": "rsnet", "resolutions": [64, 48, 32]},
        "data": {"root": str(small_data), "cache": True, "num_workers": 0, "resize_on": "device"},
        "train": {"epochs": 1, "batch_size": 6, "lr": 0.01, "progress": False, "eval_every": 0},
    }
    seen = []
    original = MultiResolutionCrop.__call__

    def spy(self, img):
        out = original(self, img)
        seen.append(tuple(o.shape[-1] for o in out))
        return out

    import unittest.mock

    with unittest.mock.patch.object(MultiResolutionCrop, "__call__", spy):
        metrics = flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    assert seen and set(seen) == {(64,)}  # the loader sent one crop per image, at the largest resolution
    assert set(metrics["train_top1"]) == {"64", "48", "32"}  # and the step saw every resolution


def _keyed_loader(ds, workers: int, seed: int):
    """Batches of 4 of ``ds`` in KeyedSampler order, made by ``workers`` processes (kept across epochs)."""
    from torch.utils.data import DataLoader

    from flexres.data import KeyedSampler

    return DataLoader(
        ds,
        batch_size=4,
        sampler=KeyedSampler(len(ds), seed=seed),
        num_workers=workers,
        collate_fn=collate_skipping,
        persistent_workers=workers > 0,
    )


def test_keyed_samples_are_the_same_whichever_worker_makes_them_and_differ_by_epoch(small_data):
    ds = ImageFolderDataset(small_data / "train", transform=MultiResolutionCrop([48, 32]), progress=False)

    def epoch_batches(workers: int, epoch: int, loader=None):
        loader = _keyed_loader(ds, workers, seed=5) if loader is None else loader
        loader.sampler.set_epoch(epoch)
        return loader, [(b["inputs"][0], b["labels"]) for b in loader]

    _, inline = epoch_batches(0, 1)
    persistent, first = epoch_batches(2, 0)
    _, again = epoch_batches(2, 1, persistent)  # the same worker processes, a second epoch
    for (x, y), (x2, y2) in zip(inline, again):
        assert torch.equal(y, y2) and torch.equal(x, x2)  # same order, same crops
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # another epoch, other draws
    assert sorted(int(v) for _, y in first for v in y) == sorted(label for _, label in ds.samples)  # every sample once


def _keyed_batches(root, workers: int, cache: bool = False, on_device: bool = False):
    """Epoch 2 of a KeyedSampler loader over ``root`` with ``workers`` processes: (largest crops, labels) per batch."""
    ds = ImageFolderDataset(
        root, transform=MultiResolutionCrop([48, 32], on_device=on_device), cache=cache, progress=False
    )
    assert ds.cached == cache
    loader = _keyed_loader(ds, workers, seed=2)
    loader.sampler.set_epoch(2)
    return [(b["inputs"][0], b["labels"]) for b in loader]


def test_the_streaming_loader_yields_the_cached_folders_samples(small_data):
    """No decoded cache, JPEGs read by two worker processes (the large-data pipeline) against the in-memory folder
    dataset read inline: the same images, labels and crops, batch by batch."""
    cached = _keyed_batches(small_data / "train", 0, cache=True, on_device=True)
    streamed = _keyed_batches(small_data / "train", 2, on_device=True)
    assert len(cached) == len(streamed) == 3
    for (x, y), (x2, y2) in zip(cached, streamed, strict=True):
        assert torch.equal(y, y2) and torch.equal(x, x2)


# --- tar shards (flexres.data.shards) ---


def _shard(small_data, dst, per_shard: int = 5):
    from flexres.data.shards import write_shards

    for split in ("train", "val"):
        write_shards(small_data / split, dst / split, images_per_shard=per_shard)
    return dst


def test_a_sharded_split_reads_as_its_folder_same_classes_labels_and_pixels(small_data, tmp_path):
    root = _shard(small_data, tmp_path / "shards")
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    folder = ImageFolderDataset(small_data / "train", progress=False)
    shards = ImageFolderDataset(root / "train", progress=False)
    assert shards.classes == folder.classes and len(shards) == len(folder) == 12
    for i in range(len(folder)):
        (path, label), (name, shard_label) = folder.samples[i], shards.samples[i]
        assert shard_label == label and name.endswith(".tar:" + str(Path(path).relative_to(small_data / "train")))
        assert torch.equal(shards.image(i), folder.image(i))
    cached = ImageFolderDataset(root / "train", cache=True, progress=False)
    assert torch.equal(cached[3][0], folder[3][0]) and cached[3][1] == folder[3][1]


def test_the_sharded_loader_with_workers_yields_the_folders_batches(small_data, tmp_path):
    root = _shard(small_data, tmp_path / "shards")
    folder, sharded = _keyed_batches(small_data / "train", 0), _keyed_batches(root / "train", 2)
    for (x, y), (x2, y2) in zip(folder, sharded, strict=True):
        assert torch.equal(y, y2) and torch.equal(x, x2)


def test_a_run_trains_on_shards_to_the_same_weights_as_on_folders(small_data, tmp_path):
    import flexres

    def run(root, name):
        cfg = {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [48, 32]},
            "data": {"root": str(root), "cache": False, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 6, "lr": 0.01, "progress": False, "eval_every": 1, "amp": False},
        }
        metrics = flexres.train(cfg, tmp_path / name, log=lambda s: None)
        return metrics, flexres.load_checkpoint(tmp_path / name)[0].state_dict()

    (m1, w1), (m2, w2) = run(small_data, "folder"), run(_shard(small_data, tmp_path / "shards"), "shards")
    assert m1["val_top1"] == m2["val_top1"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_shards_name_a_bad_member_and_an_unreadable_image(small_data, tmp_path):
    import io
    import tarfile

    flat = tmp_path / "flat"
    flat.mkdir()
    with tarfile.open(flat / "a.tar", "w") as tar:
        tar.add(next((small_data / "train").rglob("*.JPEG")), arcname="no_class.JPEG")
    with pytest.raises(ValueError, match="a.tar: member 'no_class.JPEG' is not <class>/<image>"):
        ImageFolderDataset(flat)
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "a.tar", "w") as tar:
        info = tarfile.TarInfo("cls/broken.jpg")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"not a jpg"))
    with pytest.raises(UnreadableImageError, match="a.tar:cls/broken.jpg"):
        ImageFolderDataset(bad, progress=False)[0]


def test_the_shards_command_packs_every_split_into_a_data_root(small_data, tmp_path, capsys):
    from flexres.cli import main

    assert main(["shards", str(small_data), str(tmp_path / "packed"), "--images-per-shard", "4"]) == 0
    assert "train: 3 shards, val: 2 shards" in capsys.readouterr().out
    val = ImageFolderDataset(tmp_path / "packed" / "val", progress=False)
    assert [label for _, label in val.samples] == [label for _, label in ImageFolderDataset(small_data / "val").samples]
