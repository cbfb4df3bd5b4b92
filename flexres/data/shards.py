"""A split stored as tar shards instead of millions of small files (as WebDataset's archives: plain, uncompressed
tar files whose members are ``<class>/<image>``), read by random access.

Where a file system is slow at opening many small files (network and object stores), a split of 1.28 M JPEGs costs
more in file opens than in decoding. ``write_shards`` packs a split into a few hundred tar files; a dataset reads
their headers once (the offset and size of every member) and then each image with one seek and one read on a file
it keeps open. Random access keeps the map-style interface, so the samplers (KeyedSampler, DistributedSampler),
exact resume and every evaluation work on shards as on folders: ``ImageFolderDataset`` reads either.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class Member:
    """Where one image lies: its shard, the byte offset and size of its data there."""

    shard: str
    offset: int
    size: int


def is_shard_dir(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds tar shards (and no class folders)."""
    entries = list(Path(root).iterdir())
    return any(p.suffix == SHARD_SUFFIX for p in entries) and not any(p.is_dir() for p in entries)


def index_shards(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]], list[Member]]:
    """(classes, samples as (``shard:member`` name, label), member locations) of the shards in ``root``, in shard and
    member order. Classes are the members' first path component, sorted as torchvision's ImageFolder sorts folders,
    so a split labels its images the same way packed or not. Only headers are read (tarfile seeks over the data)."""
    found: list[tuple[str, str, Member]] = []
    for shard in sorted(p for p in Path(root).iterdir() if p.suffix == SHARD_SUFFIX):
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed only, which random access needs
            for m in tar:
                if not m.isfile() or not m.name.lower().endswith(IMG_EXTENSIONS):
                    continue
                cls, sep, _ = m.name.partition("/")
                if not sep:
                    raise ValueError(f"{shard}: member {m.name!r} is not <class>/<image>")
                found.append((cls, f"{shard}:{m.name}", Member(str(shard), m.offset_data, m.size)))
    if not found:
        raise FileNotFoundError(f"no images found in the tar shards under {root} (members must be <class>/<image>)")
    classes = sorted({cls for cls, _, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(name, index[cls]) for cls, name, _ in found], [m for _, _, m in found]


class ShardReader:
    """Reads members by offset, one open file per shard and process (a DataLoader worker opens its own after the
    fork: a file object shared across processes would share its position)."""

    def __init__(self) -> None:
        self._files: dict[str, io.BufferedReader] = {}
        self._pid = os.getpid()

    def read(self, member: Member) -> bytes:
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(member.shard)
        if f is None:
            f = self._files[member.shard] = open(member.shard, "rb")  # noqa: SIM115 - kept open for the next reads
        f.seek(member.offset)
        return f.read(member.size)

    def __getstate__(self) -> dict:
        return {"_files": {}, "_pid": self._pid}  # open files do not pickle (spawned workers): each reopens


def write_shards(src: str | os.PathLike, dst: str | os.PathLike, images_per_shard: int = 1000) -> list[Path]:
    """Pack the ImageFolder split ``src`` (``<class>/<image>``) into ``dst/shard-000000.tar`` ..., members named
    ``<class>/<image>``, in the folder's sorted order. Each shard is written to a temporary name and renamed when
    complete, so an interrupted run leaves no truncated shard behind."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, got {images_per_shard}")
    src, dst = Path(src), Path(dst)
    _, class_to_idx = find_classes(str(src))
    samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for k, start in enumerate(range(0, len(samples), images_per_shard)):
        path = dst / f"shard-{k:06d}{SHARD_SUFFIX}"
        tmp = path.with_suffix(".tar.partial")
        with tarfile.open(tmp, mode="w") as tar:
            for file, _ in samples[start : start + images_per_shard]:
                tar.add(file, arcname=str(Path(file).relative_to(src)), recursive=False)
        tmp.replace(path)
        written.append(path)
    return written
