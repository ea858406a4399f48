"""Source adapters: listing in the real on-disk layouts, id mappings, bad input, and the generated dataset.

Each file adapter gets a tiny copy of its dataset's exact layout written in ``tmp_path``; the expected
listing below is written by hand from each dataset's documentation, and the fixture files are made from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.sources import SOURCES, build_source
from pipeline.data.sources.ade20k import ADE20KSource
from pipeline.data.sources.base import IGNORE_INDEX, BadSampleError, DatasetSource, SampleRef
from pipeline.data.sources.camvid import CamVidSource
from pipeline.data.sources.cityscapes import CityscapesSource
from pipeline.data.sources.cocostuff import COCOStuffSource
from pipeline.data.sources.generated import (
    BAND_CLASSES,
    COLOURS,
    GeneratedSource,
    draw_scene,
    render,
)

CAMVID = (Path(__file__).parents[3] / ".." / "shared" / "data" / "camvid").resolve()
HEIGHT, WIDTH = 10, 12  # fixture images


@dataclass(frozen=True)
class Case:
    """One file adapter and a hand-written description of a tiny copy of its dataset."""

    source: type[DatasetSource]
    listing: dict[str, list[tuple[str, str, str]]]  # split -> sorted (sample_id, image, label)
    folders: dict[str, tuple[str, str]]  # split -> (image folder, label folder)
    pairs: tuple[tuple[int, int], ...]  # raw label value -> train id
    fill: int  # a valid raw value for the rest of each label
    outside: int  # a raw value outside the mapping
    num_classes: int
    distractors: tuple[str, ...] = ()  # files of the real layout that are not samples

    def __str__(self) -> str:
        return self.source.name


def _cityscapes(split: str, city: str, frame: str) -> tuple[str, str, str]:
    stem = f"{city}_{frame}"
    return (
        stem,
        f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
        f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png",
    )


def _ade(split: str, folder: str, number: int, prefix: str = "ADEChallengeData2016/") -> tuple[str, str, str]:
    stem = f"ADE_{split}_{number:08d}"
    return stem, f"{prefix}images/{folder}/{stem}.jpg", f"{prefix}annotations/{folder}/{stem}.png"


def _coco(folder: str, image_id: int) -> tuple[str, str, str]:
    stem = f"{image_id:012d}"
    return stem, f"images/{folder}/{stem}.jpg", f"annotations/{folder}/{stem}.png"


def _camvid(split: str, stem: str) -> tuple[str, str, str]:
    return stem, f"{split}/{stem}.png", f"{split}annot/{stem}.png"


CASES = (
    Case(
        CityscapesSource,
        listing={
            "train": [
                _cityscapes("train", "aachen", "000000_000019"),
                _cityscapes("train", "aachen", "000001_000019"),
                _cityscapes("train", "bochum", "000000_000313"),
            ],
            "val": [
                _cityscapes("val", "frankfurt", "000000_000294"),
                _cityscapes("val", "lindau", "000000_000019"),
            ],
        },
        folders={split: (f"leftImg8bit/{split}", f"gtFine/{split}") for split in ("train", "val")},
        pairs=((26, 13), (0, 255), (7, 0), (33, 18), (1, 255), (24, 11), (29, 255)),
        fill=7,
        outside=34,
        num_classes=19,
        distractors=(
            "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png",
            "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png",
            "leftImg8bit/train/README",
        ),
    ),
    Case(
        ADE20KSource,
        listing={
            "train": [_ade("train", "training", n) for n in (1, 2, 10)],
            "val": [_ade("val", "validation", 1), _ade("val", "validation", 2)],
        },
        folders={
            split: tuple(f"ADEChallengeData2016/{kind}/{folder}" for kind in ("images", "annotations"))
            for split, folder in (("train", "training"), ("val", "validation"))
        },
        pairs=((0, 255), (150, 149), (1, 0), (13, 12)),
        fill=1,
        outside=151,
        num_classes=150,
        distractors=("ADEChallengeData2016/objectInfo150.txt", "ADEChallengeData2016/sceneCategories.txt"),
    ),
    Case(
        COCOStuffSource,
        listing={
            "train": [_coco("train2017", 9), _coco("train2017", 25), _coco("train2017", 30)],
            "val": [_coco("val2017", 139), _coco("val2017", 285)],
        },
        folders={
            split: (f"images/{folder}", f"annotations/{folder}")
            for split, folder in (("train", "train2017"), ("val", "val2017"))
        },
        pairs=((0, 0), (12, 11), (181, 170), (255, 255), (91, 80), (10, 10), (13, 12)),
        fill=0,
        outside=11,  # street sign: a COCO id no image uses
        num_classes=171,
    ),
    Case(
        CamVidSource,
        listing={
            "train": [
                _camvid("train", "0001TP_006690"),
                _camvid("train", "0001TP_006720"),
                _camvid("train", "0006R0_f00930"),
            ],
            "val": [_camvid("val", "0016E5_07959"), _camvid("val", "0016E5_07961")],
        },
        folders={split: (split, f"{split}annot") for split in ("train", "val")},
        pairs=((11, 255), (0, 0), (10, 10), (3, 3)),
        fill=3,
        outside=12,
        num_classes=11,
        distractors=("train.txt", "val.txt"),
    ),
)


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (HEIGHT, WIDTH)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def write_label(
    path: Path,
    case: Case,
    values: tuple[int, ...] = (),
    size: tuple[int, int] = (HEIGHT, WIDTH),
) -> None:
    """A label filled with ``case.fill`` whose first row starts with ``values``."""
    label = np.full(size, case.fill, np.uint8)
    label[0, : len(values)] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label, mode="L").save(path)


def make_dataset(root: Path, case: Case, empty: bool = False) -> Path:
    """The case's layout under ``root``: every listed sample (none if ``empty``), its folders, distractors."""
    rng = np.random.default_rng(0)
    for image_folder, label_folder in case.folders.values():
        (root / image_folder).mkdir(parents=True, exist_ok=True)
        (root / label_folder).mkdir(parents=True, exist_ok=True)
    for rows in [] if empty else case.listing.values():
        for _, image, label in reversed(rows):
            write_image(root / image, rng)
            write_label(root / label, case, tuple(raw for raw, _ in case.pairs))
    for distractor in case.distractors:
        (root / distractor).parent.mkdir(parents=True, exist_ok=True)
        (root / distractor).write_bytes(b"not a sample")
    return root


def listed(source: DatasetSource, split: str) -> list[tuple[str, str, str | None]]:
    refs = list(source.samples(split))
    assert all(ref.split == split for ref in refs)
    return [(ref.sample_id, ref.image, ref.label) for ref in refs]


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def test_lists_the_real_layout_sorted(tmp_path: Path, case: Case) -> None:
    source = case.source(make_dataset(tmp_path, case))
    assert source.splits == ("train", "val")
    for split, expected in case.listing.items():
        assert listed(source, split) == expected
    with pytest.raises(ValueError, match="no split 'training'"):
        source.samples("training")


def test_maps_raw_values_to_train_ids(tmp_path: Path, case: Case) -> None:
    source = case.source(make_dataset(tmp_path, case))
    sample = source.load(next(iter(source.samples("train"))))
    assert sample.label.dtype == np.uint8 and sample.label.shape == (HEIGHT, WIDTH)
    assert (sample.height, sample.width) == (HEIGHT, WIDTH)
    assert sample.label[0, : len(case.pairs)].tolist() == [train for _, train in case.pairs]
    assert Image.open(io.BytesIO(sample.image)).size == (WIDTH, HEIGHT)


def test_class_tables(case: Case) -> None:
    source = case.source
    assert len(source.classes) == len(source.palette) == case.num_classes
    assert len(set(source.classes)) == case.num_classes
    assert all(name and name == name.strip() for name in source.classes)
    assert all(len(colour) == 3 and all(0 <= c <= 255 for c in colour) for colour in source.palette)
    train_ids = [train for train in source.id_mapping.values() if train != IGNORE_INDEX]
    assert sorted(train_ids) == list(range(case.num_classes))  # every class reached from exactly one raw id
    assert case.outside not in source.id_mapping


@pytest.mark.parametrize(
    ("damage", "target", "reason"),
    [
        ("value outside the mapping", "label", "outside the"),
        ("label of another size", "label", "label is 11x10 but image"),
        ("label file missing", "label", "label file is missing"),
        ("image bytes corrupt", "image", "unreadable image"),
        ("image truncated", "image", "unreadable image"),
        ("label in RGB", "label", "single-channel"),
    ],
)
def test_bad_sample_names_its_file(tmp_path: Path, case: Case, damage: str, target: str, reason: str) -> None:
    source = case.source(make_dataset(tmp_path, case))
    ref = next(iter(source.samples("train")))
    image, label = tmp_path / ref.image, tmp_path / str(ref.label)
    if damage == "value outside the mapping":
        write_label(label, case, (case.fill, case.outside))
    elif damage == "label of another size":
        write_label(label, case, size=(HEIGHT, WIDTH - 1))
    elif damage == "label file missing":
        label.unlink()
        assert listed(source, "train") == case.listing["train"]  # still listed, fails only on load
    elif damage == "image bytes corrupt":
        image.write_bytes(b"\x89PNG garbage" * 20)
    elif damage == "image truncated":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    else:
        Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(label)
    with pytest.raises(BadSampleError, match=reason) as caught:
        source.load(ref)
    assert caught.value.path == str(image if target == "image" else label)
    assert str(caught.value).startswith(caught.value.path)


def test_missing_split_folder(tmp_path: Path, case: Case) -> None:
    root = make_dataset(tmp_path / "data", case)
    image_folder = case.folders["val"][0]
    shutil.rmtree(root / image_folder)
    source = case.source(root)
    assert len(listed(source, "train")) == len(case.listing["train"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / image_folder))):
        source.samples("val")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="split folder is missing"):
        case.source(bare).samples("train")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        case.source(tmp_path / "nowhere")


def test_empty_dataset_lists_nothing(tmp_path: Path, case: Case) -> None:
    source = case.source(make_dataset(tmp_path, case, empty=True))
    assert all(listed(source, split) == [] for split in source.splits)


def test_ade20k_root_may_be_the_challenge_folder_itself(tmp_path: Path) -> None:
    case = CASES[1]
    make_dataset(tmp_path, case)
    inner = ADE20KSource(tmp_path / "ADEChallengeData2016")
    assert listed(inner, "val") == [_ade("val", "validation", n, prefix="") for n in (1, 2)]
    assert inner.load(next(iter(inner.samples("val")))).label[0, 1] == 149


def test_cocostuff_keeps_exactly_the_171_used_ids() -> None:
    mapping = COCOStuffSource.id_mapping
    unused = sorted(set(range(182)) - set(mapping))
    assert unused == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    used = [raw for raw in range(182) if raw in mapping]
    assert [mapping[raw] for raw in used] == list(range(171))  # dense and in order
    assert COCOStuffSource.classes[mapping[12]] == "stop sign" and COCOStuffSource.classes[-1] == "wood"
    assert COCOStuffSource.classes[mapping[91]] == "banner"  # first stuff class (COCO id 92)


def test_camvid_accepts_the_test_split(tmp_path: Path) -> None:
    case = CASES[3]
    root = make_dataset(tmp_path, case)
    write_image(root / "test" / "0001TP_008550.png", np.random.default_rng(1))
    assert listed(CamVidSource(root), "test") == [_camvid("test", "0001TP_008550")]


def test_cityscapes_maps_every_label_id() -> None:
    mapping = CityscapesSource.id_mapping
    assert sorted(mapping) == list(range(34))
    assert {raw for raw, train in mapping.items() if train != IGNORE_INDEX} == {
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    }
    assert CityscapesSource.palette[mapping[26]] == (0, 0, 142)  # car
    assert CityscapesSource.classes[mapping[31]] == "train"


def test_build_source(tmp_path: Path) -> None:
    assert sorted(SOURCES) == ["ade20k", "camvid", "cityscapes", "cocostuff", "generated"]
    assert isinstance(build_source("camvid", make_dataset(tmp_path, CASES[3])), CamVidSource)
    generated = build_source("generated", None, seed=3, counts={"train": 2})
    assert isinstance(generated, GeneratedSource) and generated.extra()["seed"] == 3
    with pytest.raises(ValueError, match=r"unknown dataset source 'kitti'.*'ade20k', 'camvid'"):
        build_source("kitti", tmp_path)
    with pytest.raises(FileNotFoundError, match="needs a root"):
        build_source("camvid", None)
    with pytest.raises(TypeError):
        build_source("camvid", tmp_path, seed=1)


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"no CamVid copy at {CAMVID}")
def test_real_camvid() -> None:
    source = CamVidSource(CAMVID)
    train, val = list(source.samples("train")), list(source.samples("val"))
    assert (len(train), len(val)) == (367, 101)
    assert train[0] == SampleRef(
        "0001TP_006690", "train", "train/0001TP_006690.png", "trainannot/0001TP_006690.png"
    )
    assert len({ref.sample_id for ref in train + val}) == 468
    sample = source.load(train[0])
    assert (sample.width, sample.height) == (480, 360) and sample.label.shape == (360, 480)
    raw = np.array(Image.open(CAMVID / str(train[0].label)))
    assert np.array_equal(sample.label, np.where(raw == 11, IGNORE_INDEX, raw))
    assert set(np.unique(sample.label).tolist()) <= set(range(11)) | {IGNORE_INDEX}
    assert sample.image == (CAMVID / train[0].image).read_bytes()  # the file's bytes, untouched


# --- the generated dataset -------------------------------------------------------------------------------


def digest(source: GeneratedSource, ref: SampleRef) -> str:
    sample = source.load(ref)
    return hashlib.sha256(sample.image + sample.label.tobytes()).hexdigest()


def test_generated_listing_and_settings() -> None:
    source = GeneratedSource(seed=5, image_size=(48, 80), counts={"train": 3, "val": 0, "test": 2})
    assert source.splits == ("train", "val", "test")
    assert list(source.samples("train")) == [
        SampleRef(f"train-{i:06d}", "train", f"generated://5/train/{i}", None) for i in range(3)
    ]
    assert list(source.samples("val")) == [] and len(list(source.samples("test"))) == 2
    assert source.extra() == {
        "generator_version": 1,
        "seed": 5,
        "image_size": [48, 80],
        "counts": {"train": 3, "val": 0, "test": 2},
    }
    sample = source.load(next(iter(source.samples("test"))))
    assert (sample.height, sample.width) == (48, 80) and sample.label.shape == (48, 80)
    decoded = Image.open(io.BytesIO(sample.image))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (80, 48)
    default = GeneratedSource()
    assert {s: len(list(default.samples(s))) for s in default.splits} == {"train": 64, "val": 16}
    with pytest.raises(ValueError, match="no split 'val'"):
        GeneratedSource(counts={"train": 1}).samples("val")
    for bad in ({"seed": -1}, {"image_size": (16, 64)}, {"counts": {"train": -1}}):
        with pytest.raises(ValueError):
            GeneratedSource(**bad)


def test_generated_is_deterministic_and_seeded() -> None:
    counts = {"train": 4, "val": 2}
    first, other = GeneratedSource(seed=1, counts=counts), GeneratedSource(seed=2, counts=counts)
    again = pickle.loads(pickle.dumps(GeneratedSource(seed=1, counts=counts)))  # as sent to a worker
    refs = [ref for split in counts for ref in first.samples(split)]
    digests = [digest(first, ref) for ref in refs]
    assert [digest(again, ref) for ref in reversed(refs)] == digests[::-1]  # order does not matter
    assert len(set(digests)) == len(digests)  # every sample differs
    other_refs = [ref for split in counts for ref in other.samples(split)]
    assert not set(digests) & {digest(other, ref) for ref in other_refs}


def test_generated_is_the_same_in_another_process() -> None:
    ref = next(iter(GeneratedSource(seed=7).samples("val")))
    code = (
        "import hashlib; from pipeline.data.sources.generated import GeneratedSource\n"
        "s = GeneratedSource(seed=7); x = s.load(next(iter(s.samples('val'))))\n"
        "print(hashlib.sha256(x.image + x.label.tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a str hash in the seeding would show here
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).parents[3],
    )
    assert result.stdout.strip() == digest(GeneratedSource(seed=7), ref)


def test_generated_rejects_foreign_references() -> None:
    source = GeneratedSource(seed=1, counts={"train": 2})
    for uri, reason in (
        ("generated://2/train/0", "not a sample of this source"),
        ("generated://1/train/2", "index outside"),
        ("generated://1/val/0", "index outside"),
        ("train/000.png", "not a generated://"),
    ):
        with pytest.raises(BadSampleError, match=reason) as caught:
            source.load(SampleRef("x", "train", uri, None))
        assert caught.value.path == uri


def test_generated_labels() -> None:
    source = GeneratedSource(seed=0, image_size=(64, 96), counts={"train": 12})
    seen: set[int] = set()
    for ref in source.samples("train"):
        label = source.load(ref).label
        seen |= set(np.unique(label).tolist())
        rim = np.ones(label.shape, bool)
        rim[1:-1, 1:-1] = False  # 1 px wide at this size
        assert ((label == IGNORE_INDEX) == rim).all()
    assert seen == set(range(len(source.classes))) | {IGNORE_INDEX}


def _window_has(mask: np.ndarray, radius: int) -> np.ndarray:
    """Per pixel: does the (2r+1)^2 window around it contain a True of ``mask``? (a box max filter)"""
    padded = np.pad(mask.astype(np.int64), radius)
    total = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    side = 2 * radius + 1
    window = total[side:, side:] - total[:-side, side:] - total[side:, :-side] + total[:-side, :-side]
    return window > 0


def test_band_class_is_invisible_within_41x41() -> None:
    """Re-render scenes with their band classes permuted (same geometry, same noise draws): many pixels
    change label while no pixel within 20 px of them changes, so no 41x41 window can tell their class."""
    permute = dict(zip(BAND_CLASSES, BAND_CLASSES[1:] + BAND_CLASSES[:1], strict=True))
    fractions = []
    for index in range(30):
        scene = draw_scene(np.random.default_rng(index), 128, 128)
        swapped = dataclasses.replace(
            scene,
            bands=tuple(dataclasses.replace(band, class_id=permute[band.class_id]) for band in scene.bands),
        )
        image, label = render(scene, np.random.default_rng(1000 + index))
        image_swapped, label_swapped = render(swapped, np.random.default_rng(1000 + index))
        changed = (image != image_swapped).any(axis=-1)
        assert changed.mean() < 0.03  # only the markers show the class
        assert (label[changed] != label_swapped[changed]).all()
        context_only = (label != label_swapped) & ~_window_has(changed, 20)
        fractions.append(context_only.mean())
    assert min(fractions) > 0.0 and np.mean(fractions) > 0.08


def test_band_looks_do_not_depend_on_class() -> None:
    """The permutation test above keeps a scene's geometry; here: geometry and grey are drawn alike for
    every band class (means per class agree within a few standard errors)."""
    bands = [band for i in range(1500) for band in draw_scene(np.random.default_rng(i), 128, 128).bands]
    for field, tolerance in (("thickness", 0.25), ("end", 1.5), ("grey", 1.5), ("period", 0.4)):
        means = [np.mean([getattr(b, field) for b in bands if b.class_id == c]) for c in BAND_CLASSES]
        assert max(means) - min(means) < tolerance, (field, means)
    for horizontal in (True, False):
        shares = [
            np.mean([b.horizontal == horizontal for b in bands if b.class_id == c]) for c in BAND_CLASSES
        ]
        assert max(shares) - min(shares) < 0.05


def test_band_class_is_told_at_the_row_or_column_start() -> None:
    """From the public samples alone: the marker colour at the start of a band pixel's row or column names
    the pixel's class, even far from that marker (beyond a 41x41 window)."""
    source = GeneratedSource(seed=3, image_size=(128, 128), counts={"train": 20})
    centres = {c: np.array(COLOURS[c], float) for c in BAND_CLASSES}

    def marker_class(pixels: np.ndarray) -> int | None:
        distances = {c: np.linalg.norm(pixels.mean(axis=0) - colour) for c, colour in centres.items()}
        best = min(distances, key=distances.get)
        return best if distances[best] < 60 else None

    told = []
    for ref in source.samples("train"):
        sample = source.load(ref)
        image = np.array(Image.open(io.BytesIO(sample.image)), dtype=float)
        # Markers fill rows/columns 2..7; from (29, 29) on, a pixel's 41x41 window holds none of them.
        far = np.zeros(sample.label.shape, bool)
        far[29:, 29:] = np.isin(sample.label[29:, 29:], BAND_CLASSES)
        by_row = np.array([marker_class(image[y, 2:8]) or 0 for y in range(128)])  # (H,) 0: no marker
        by_column = np.array([marker_class(image[2:8, x]) or 0 for x in range(128)])  # (W,)
        ys, xs = np.nonzero(far)
        told.append((sample.label[ys, xs] == by_row[ys]) | (sample.label[ys, xs] == by_column[xs]))
    told_all = np.concatenate(told)
    assert told_all.size > 20 * 1000 and told_all.all()
