"""`wds:` datasets: webdataset tar shards in clip_benchmark's `wds/` layout, read as a stream.

Two spellings:
  wds:/data/shards/{000000..000009}.tar  a brace pattern (or one .tar): the set is one split, recorded as
                                         "all"; classnames.txt and zeroshot_classification_templates.txt
                                         are looked for beside the shards, then in their parent folder;
  wds:/data/cifar10                      clip_benchmark's export folder: <dir>/<split>/nshards.txt and
                                         <dir>/<split>/0.tar ..., metadata files in <dir>.
Each sample is an image (.webp / .png / .jpg / .jpeg) with a class index (.cls: classification) or its
captions (.txt, one per line: retrieval), as clip_benchmark writes them.

One first pass reads only the .cls / .txt members (webdataset's `select_files`), so the labels, captions and
per-shard counts are known up front. The images are then read on demand by `ShardSamples`, a sequence whose
reads walk forward through the tars with webdataset, so the set never needs to fit in memory; slicing (one
torchrun rank's share) and `take` (--limit) open only the tars they need.
"""
from __future__ import annotations

import bisect
import itertools
import tarfile
from collections.abc import Sequence
from pathlib import Path

from siglip_dola.data.eval_dataset import EvalDataset, MissingDependencyError
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL

WDS_PREFIX = "wds:"
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
LABEL_EXTENSIONS = ("cls", "txt")
WEBDATASET_HINT = "install it with `pip install 'siglip-dola[webdataset]'` (or `pip install webdataset`)"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _webdataset():
    try:
        import webdataset
    except ImportError as err:
        raise MissingDependencyError(f"wds: datasets need the webdataset package: {WEBDATASET_HINT}") from err
    return webdataset


def _samples(urls: list[str], select_files=None):
    """webdataset's sample dicts ({"__key__", "__url__", ext: bytes}) of `urls` in order, no splitting."""
    wds = _webdataset()
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(select_files=select_files)))


def shard_urls(spec: str, split: str) -> tuple[list[str], list[Path], str]:
    """(tar paths in order, folders to look in for the metadata files, split name) of a `wds:` spec."""
    from braceexpand import braceexpand  # a dependency of webdataset

    path = spec[len(WDS_PREFIX):]
    if not path:
        raise ValueError(f"dataset {spec!r}: give the shards after 'wds:', e.g. wds:/data/shards/{{000000..000009}}.tar "
                         "or wds:FOLDER in clip_benchmark's export layout")
    if Path(path).is_dir():
        counts = Path(path) / split / "nshards.txt"
        if not counts.is_file():
            raise FileNotFoundError(f"dataset {spec!r}: split {split!r} not found: looked for {str(counts)!r} "
                                    "(clip_benchmark's layout: FOLDER/<split>/nshards.txt and FOLDER/<split>/0.tar ...)")
        n_shards = int(counts.read_text(encoding="utf-8").strip())
        return [str(Path(path) / split / f"{i}.tar") for i in range(n_shards)], [Path(path)], split
    urls = list(braceexpand(path))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        shown = ", ".join(repr(u) for u in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"dataset {spec!r}: {len(missing)} of {len(urls)} shard(s) not found: looked for {shown}")
    folder = Path(urls[0]).parent
    return urls, [folder, folder.parent], "all"


def _metadata(folders: list[Path], name: str) -> list[str] | None:
    """Non-empty stripped lines of the first `name` found in `folders`, or None."""
    for folder in folders:
        if (folder / name).is_file():
            return [line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


class _Unreadable:
    """Stands in for an image that did not decode: the embedding loop's `.convert` raises the error, so the
    item is reported and skipped like an unreadable file."""

    def __init__(self, error: str):
        self.error = error

    def convert(self, mode):
        raise OSError(self.error)


def _decode(sample: dict):
    """The sample's image as PIL (decoded by webdataset's image handler), or _Unreadable."""
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        return _Unreadable(f"sample has no image (.{'/.'.join(IMAGE_EXTENSIONS)}), only {sorted(sample)}")
    try:
        return _webdataset().autodecode.ImageHandler("pil")(extension, sample[extension])
    except Exception as err:  # noqa: BLE001 - a bad sample is reported by the embedding loop, not raised
        return _Unreadable(f"{type(err).__name__}: {err}")


class ShardSamples(Sequence):
    """(key, PIL image) of the samples at `positions` (ascending indices over all shards), read from the tars.

    Reads that go forward continue the open stream (a DataLoader worker reads its sub-batches in order);
    a read behind it reopens at the tar holding that sample. Picklable (the stream is not kept)."""

    def __init__(self, urls: list[str], counts: list[int], keys: list[str], positions: Sequence[int]):
        self.urls, self.counts, self.keys, self.positions = urls, counts, keys, positions
        self.starts = [0, *itertools.accumulate(counts)][:-1]  # index of each tar's first sample
        self._stream, self._next = None, 0

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, positions: Sequence[int]) -> "ShardSamples":
        return ShardSamples(self.urls, self.counts, self.keys, [self.positions[i] for i in positions])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ShardSamples(self.urls, self.counts, self.keys, self.positions[index])
        position = self.positions[index]
        return self.keys[position], _decode(self._read(position))

    def _read(self, position: int) -> dict:
        if self._stream is None or position < self._next:
            shard = bisect.bisect_right(self.starts, position) - 1
            self._stream, self._next = _samples(self.urls[shard:]), self.starts[shard]
        while True:
            try:
                sample = next(self._stream)
            except StopIteration:
                raise RuntimeError(f"shards changed while being read: they end before sample {position}") from None
            except (tarfile.TarError, OSError) as err:
                raise ValueError(f"shard could not be read ({type(err).__name__}: {err})") from None
            self._next += 1
            if self._next - 1 == position:
                break
        if sample["__key__"] != self.keys[position]:
            raise RuntimeError(f"shards changed while being read: sample {position} is {sample['__key__']!r}, "
                               f"was {self.keys[position]!r}")
        return sample

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_next": 0}


def _index(urls: list[str], spec: str) -> tuple[list[str], list[int], list[str | None], list[str | None]]:
    """(keys, samples per shard, .cls texts, .txt texts) from the label members alone."""
    keys, cls, txt, per_url = [], [], [], {}
    wanted = lambda name: name.rsplit(".", 1)[-1].lower() in LABEL_EXTENSIONS  # noqa: E731
    try:
        for sample in _samples(urls, select_files=wanted):
            keys.append(sample["__key__"])
            per_url[sample["__url__"]] = per_url.get(sample["__url__"], 0) + 1
            cls.append(sample["cls"].decode("utf-8") if "cls" in sample else None)
            txt.append(sample["txt"].decode("utf-8") if "txt" in sample else None)
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"dataset {spec!r}: the shards could not be read as webdataset tars "
                         f"({type(err).__name__}: {err})") from None
    return keys, [per_url.get(u, 0) for u in urls], cls, txt


def webdataset_dataset(spec: str, split: str = "test") -> EvalDataset:
    """The EvalDataset of `wds:` shards (see the module docstring): classification when every sample has .cls
    and classnames.txt exists, retrieval when every sample has .txt captions (both when both hold)."""
    urls, folders, split = shard_urls(spec, split)
    keys, counts, cls, txt = _index(urls, spec)
    if not keys:
        raise ValueError(f"dataset {spec!r}: the shards hold no samples with a .cls label or .txt captions")
    classnames = _metadata(folders, "classnames.txt")
    templates = [t.replace("{c}", "{}") for t in _metadata(folders, "zeroshot_classification_templates.txt")
                 or DEFAULT_TEMPLATES]
    tasks = ()
    if all(c is not None for c in cls):
        if classnames is None:
            raise FileNotFoundError(f"dataset {spec!r}: samples have .cls labels but classnames.txt was not found: "
                                    f"looked in {[str(f) for f in folders]}")
        tasks += (CLASSIFICATION,)
    captions = [t.splitlines() for t in txt] if all(t is not None for t in txt) else None
    if captions is not None:
        tasks += (RETRIEVAL,)
    if not tasks:
        raise ValueError(f"dataset {spec!r}: every sample needs a .cls label or .txt captions "
                         f"({sum(c is None for c in cls)} lack .cls, {sum(t is None for t in txt)} lack .txt)")
    labels = [int(c) for c in cls] if CLASSIFICATION in tasks else [-1] * len(keys)
    if labels and max(labels) >= len(classnames or []) and CLASSIFICATION in tasks:
        raise ValueError(f"dataset {spec!r}: label {max(labels)} but classnames.txt lists {len(classnames)} classes")
    return EvalDataset(spec, split, ShardSamples(urls, counts, keys, range(len(keys))), labels,
                       classnames or [], templates, captions, tasks=tasks)
