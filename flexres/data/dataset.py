"""ImageFolder data with RGB conversion, optional in-memory cache, and unreadable files named by path."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from ..errors import FlexresError
from .shards import ShardReader, index_shards, is_shard_dir


class UnreadableImageError(FlexresError, RuntimeError):
    """An image file could not be decoded. ``path`` names it."""

    # One message argument, so DataLoader workers can re-raise it in the main process intact.
    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def load_rgb(path: str, data: bytes | None = None) -> Tensor:
    """Decode any image (grayscale, RGBA, palette...) to a uint8 3 x H x W RGB tensor: the file ``path``, or the
    encoded ``data`` that ``path`` names (a member read from a tar shard)."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return pil_to_tensor(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported with its path
        raise UnreadableImageError(
            f"cannot read image {path}: {e}. Fix or remove the file, or set data.skip_unreadable=true", path
        ) from e


AUTO_CACHE_IMAGES = 10_000


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as in torchvision's ImageFolder, or ``root/*.tar`` shards of such members
    (flexres.data.shards: for file systems slow at millions of small files); items are (transform(image), label).

    cache: decode every image once into memory (uint8) up front; worth it when the set fits in RAM.
        "auto" caches sets of at most ``AUTO_CACHE_IMAGES`` images.
    skip_unreadable: an unreadable image is dropped from its batch (see ``collate_skipping``) and
    counted instead of stopping training with an error that names the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Tensor], Any] | None = None,
        cache: bool | str = False,
        skip_unreadable: bool = False,
        progress: bool = True,
    ) -> None:
        self.root = str(root)
        if not Path(self.root).is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self._members = None  # where each image lies in the tar shards, when the split is sharded
        if is_shard_dir(self.root):
            self.classes, self.samples, self._members = index_shards(self.root)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self._reader = ShardReader()
        else:
            self.classes, self.class_to_idx = find_classes(self.root)
            self.samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        if not self.samples:
            raise FileNotFoundError(f"no images found under {self.root} (expected {self.root}/<class>/<image>)")
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.unreadable: list[str] = []
        self._cache: list[Tensor | None] | None = None
        if cache == "auto":
            cache = len(self.samples) <= AUTO_CACHE_IMAGES
        if cache:
            self._cache = []
            for index in tqdm(
                range(len(self.samples)), desc=f"decoding {Path(self.root).name}", disable=not progress, leave=False
            ):
                self._cache.append(self._load(index))

    def image(self, index: int) -> Tensor:
        """Image ``index`` decoded (uint8 RGB, no transform), from its file or its shard."""
        path = self.samples[index][0]
        return load_rgb(path, None if self._members is None else self._reader.read(self._members[index]))

    def _load(self, index: int) -> Tensor | None:
        try:
            return self.image(index)
        except UnreadableImageError:
            if not self.skip_unreadable:
                raise
            self.unreadable.append(self.samples[index][0])
            return None

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int] | tuple[None, str]:
        """``index``, or (seed, index) from a KeyedSampler: the transform's random draws then come from that seed,
        so a sample's augmentation does not depend on which worker made it, or on what that worker made before."""
        seed, index = index if isinstance(index, tuple) else (None, index)
        path, label = self.samples[index]
        img = self._cache[index] if self._cache is not None else self._load(index)
        if img is None:
            return None, path  # dropped by collate_skipping, which counts it
        if self.transform is None:
            return img, label
        if seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), label


def collate_skipping(batch: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Collate (inputs, label) pairs into {"inputs", "labels", "skipped"}, dropping unreadable samples."""
    kept = [b for b in batch if b[0] is not None]
    skipped = [b[1] for b in batch if b[0] is None]
    if not kept:
        return {"inputs": None, "labels": None, "skipped": skipped}
    inputs, labels = default_collate(kept)
    return {"inputs": inputs, "labels": labels, "skipped": skipped}


def split_dir(root: str | os.PathLike, split: str) -> str:
    """``root/split``, or an error naming the folder that is missing."""
    p = Path(root) / split
    if p.is_dir():
        return str(p)
    raise FileNotFoundError(f"{Path(root)} has no '{split}/' folder (expected {Path(root)}/{split}/<class>/<image>)")


def sample_data_dir() -> Path:
    """The tiny Imagenette sample bundled with the package (10 classes, 10 train / 10 val images each)."""
    return Path(__file__).resolve().parent.parent / "sample_data" / "imagenette-tiny"


def sample_segmentation_dir() -> Path:
    """The tiny CamVid sample bundled with the package (4 train / 2 val street scenes, 11 classes + void)."""
    return Path(__file__).resolve().parent.parent / "sample_data" / "camvid-tiny"


def read_class_names(source: str | os.PathLike, folders: list[str]) -> list[str] | None:
    """Human-readable class names for ``folders`` (the class folders, in label order) from a ``classes.tsv``:
    ``source`` itself when it is a file, else the one at the data root ``source``; None when there is none.

    The file is tab-separated with a header naming at least ``wnid`` (the folder name) and ``name``, as in
    the bundled sample and ../shared/data's sets. A folder the file does not name keeps its folder name.
    """
    path = Path(source) if Path(source).is_file() else Path(source) / "classes.tsv"
    if not path.is_file():
        return None
    lines = [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = [h.strip() for h in lines[0]] if lines else []
    if "wnid" not in header or "name" not in header:
        raise ValueError(f"{path}: needs a header with the columns 'wnid' and 'name' (tab-separated), got {header}")
    w, n = header.index("wnid"), header.index("name")
    names = {row[w].strip(): row[n].strip() for row in lines[1:] if len(row) > max(w, n)}
    return [names.get(f, f) for f in folders]


class SubsetView(Dataset):
    """A subset of an ImageFolderDataset that still exposes (and forwards) ``transform``, which evaluation
    and calibration set per resolution."""

    def __init__(self, base: ImageFolderDataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    @property
    def transform(self):
        return self.base.transform

    @transform.setter
    def transform(self, value) -> None:
        self.base.transform = value

    @property
    def cached(self) -> bool:
        return self.base.cached

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]):
        if isinstance(i, tuple):  # (seed, position) from a KeyedSampler
            return self.base[(i[0], self.indices[i[1]])]
        return self.base[self.indices[i]]


class KeyedSampler(Sampler):
    """Training order for loaders that live the whole run (persistent workers): yields (seed, index), the seed of each
    sample's augmentation a function of (run seed, epoch, index) alone. So the crops of an epoch do not depend on the
    number of workers, on what a worker made before, or on where a run resumed. The order is a shuffle seeded by
    (seed, epoch), or ``base``'s (a DistributedSampler: this replica's shard)."""

    def __init__(self, size: int, seed: int, base: Sampler | None = None) -> None:
        self.size, self.seed, self.base, self.epoch = size, seed, base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.base is not None:
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.size

    def __iter__(self):
        if self.base is not None:
            order = list(self.base)
        else:
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            ).tolist()
        for index in order:
            yield ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63, index
