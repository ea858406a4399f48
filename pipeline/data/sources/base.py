"""What every source adapter provides: listing samples in a dataset's real on-disk layout and loading one.

An adapter knows its dataset's folder layout, class names, palette and the mapping of raw label values to
train ids. The shard writer calls :meth:`DatasetSource.samples` to list the work and
:meth:`DatasetSource.load` (in worker processes) to read one sample; it never looks at folders itself.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.images import to_rgb

IGNORE_INDEX = 255


class BadSampleError(ValueError):
    """A sample that cannot be used: unreadable file, size mismatch, label value outside the mapping.

    The message starts with the offending file's path.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in worker processes and pickled back to the parent: rebuild from both fields.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class SampleRef:
    """A sample to prepare: where its files are. Cheap to create and to send to worker processes.

    ``image`` and ``label`` are paths relative to the adapter's root (``label`` is None for generated
    samples, which are made from ``sample_id``).
    """

    sample_id: str
    split: str
    image: str
    label: str | None


@dataclass(frozen=True)
class LoadedSample:
    """A sample ready for a shard: the image file's bytes untouched, labels mapped to train ids."""

    image: bytes  # as on disk (PNG or JPEG)
    label: np.ndarray  # (H, W) uint8 train ids, IGNORE_INDEX for void
    height: int
    width: int


def build_lut(id_mapping: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 256-entry lookup table from raw 8-bit label values to train ids, and a mask of the mapped values."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for raw, train in id_mapping.items():
        lut[raw] = train
        known[raw] = True
    return lut, known


class DatasetSource(ABC):
    """A dataset as downloaded, under ``root``.

    Subclasses set ``name``, ``classes``, ``palette`` and ``id_mapping`` and implement :meth:`samples`;
    the default :meth:`load` reads an image file and a single-channel label file and applies the mapping.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    id_mapping: dict[int, int]  # raw label value -> train id; any other raw value is an error
    ignore_index: int = IGNORE_INDEX
    splits: tuple[str, ...] = ("train", "val")  # prepared by default
    known_splits: tuple[str, ...] = ("train", "val")  # accepted on request

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset root is not a folder")
        self._lut, self._known = build_lut(self.id_mapping)

    @abstractmethod
    def samples(self, split: str) -> Iterator[SampleRef]:
        """The samples of ``split`` in a stable order; raises FileNotFoundError naming a missing folder."""

    def size_hint(self, ref: SampleRef) -> int | None:
        """Bytes the sample will take in a shard, estimated without reading it (file sizes on disk), or
        None when unknown; the writer uses it to cut shards of a bounded size deterministically."""
        try:
            total = (self.root / ref.image).stat().st_size
            if ref.label is not None:
                total += (self.root / ref.label).stat().st_size
        except OSError:
            return None
        return total

    def split_folder(self, split: str, relative: str) -> Path:
        """``root / relative``, the folder listing ``split``, after checking both exist.

        Raises:
            ValueError: ``split`` is not one of ``known_splits``.
            FileNotFoundError: the folder is missing (the message names it).
        """
        if split not in self.known_splits:
            raise ValueError(f"{self.name} has no split {split!r}; splits: {list(self.known_splits)}")
        folder = self.root / relative
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: split folder is missing")
        return folder

    def paired_samples(self, split: str, images: str, labels: str, pattern: str) -> Iterator[SampleRef]:
        """The files matching ``pattern`` in the folder ``images``, sorted by stem, each with its expected
        label ``<labels>/<stem>.png``; the folder is checked by :meth:`split_folder`."""
        folder = self.split_folder(split, images)
        refs = [
            SampleRef(path.stem, split, f"{images}/{path.name}", f"{labels}/{path.stem}.png")
            for path in folder.glob(pattern)
        ]
        return iter(sorted(refs, key=lambda ref: ref.sample_id))

    def extra(self) -> dict[str, object]:
        """Adapter-specific facts recorded in the manifest (e.g. generator settings)."""
        return {}

    def read_image(self, ref: SampleRef) -> tuple[bytes, int, int]:
        """The image file's bytes and its (height, width), checked to decode as training will decode it."""
        path = self.root / ref.image
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
                to_rgb(image)  # a mode with no RGB conversion (32-bit float) is refused here, not in training
        except FileNotFoundError:
            raise BadSampleError(path, "image file is missing") from None
        except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
            raise BadSampleError(path, "unreadable image (not a format PIL can decode)") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise BadSampleError(path, f"unreadable image ({error})") from None
        return data, height, width

    def read_raw_label(self, ref: SampleRef) -> np.ndarray:
        """The label file as an (H, W) uint8 array of raw values."""
        if ref.label is None:
            raise BadSampleError(ref.image, "sample has no label file")
        path = self.root / ref.label
        try:
            with Image.open(path) as label:
                if label.mode not in ("L", "P"):
                    raise BadSampleError(path, f"label must be single-channel 8-bit, got mode {label.mode}")
                return np.array(label, dtype=np.uint8)
        except FileNotFoundError:
            raise BadSampleError(path, "label file is missing") from None
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise BadSampleError(path, f"unreadable label ({error})") from None

    def map_label(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Raw values -> train ids; a value outside the mapping raises BadSampleError naming ``path``."""
        unknown = ~self._known[raw]
        if unknown.any():
            values = sorted(int(v) for v in np.unique(raw[unknown]))
            raise BadSampleError(path, f"label values {values[:10]} are outside the {self.name} id mapping")
        return self._lut[raw]

    def load(self, ref: SampleRef) -> LoadedSample:
        """Read and check one sample: decodable files, equal sizes, label values inside the mapping."""
        image, height, width = self.read_image(ref)
        raw = self.read_raw_label(ref)
        if raw.shape != (height, width):
            raise BadSampleError(
                self.root / str(ref.label),
                f"label is {raw.shape[1]}x{raw.shape[0]} but image {ref.image} is {width}x{height}",
            )
        return LoadedSample(image, self.map_label(raw, self.root / str(ref.label)), height, width)
