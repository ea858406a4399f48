"""Cityscapes (fine annotations) as downloaded from cityscapes-dataset.com.

Layout under ``root`` (the folder holding ``leftImg8bit/`` and ``gtFine/``)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Labels are the ``labelIds`` files (ids 0..33), mapped to the 19 train ids of the official
cityscapesscripts table (``helpers/labels.py``); every other id is void.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.data.sources.base import IGNORE_INDEX, DatasetSource, SampleRef

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

# (name, labelId, colour) of the 19 evaluated classes, in train-id order.
_TRAIN_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
NUM_LABEL_IDS = 34  # labelIds files hold 0..33; license plate (-1) is never drawn into them


def _id_mapping() -> dict[int, int]:
    mapping = dict.fromkeys(range(NUM_LABEL_IDS), IGNORE_INDEX)
    mapping.update({label_id: train_id for train_id, (_, label_id, _) in enumerate(_TRAIN_CLASSES)})
    return mapping


class CityscapesSource(DatasetSource):
    """Cityscapes fine: 19 classes; splits train/val (``test`` is listed on request, its labels are dummies).

    Sample ids are the file stems ``<city>_<seq>_<frame>``, unique across splits.
    """

    name = "cityscapes"
    classes = tuple(name for name, _, _ in _TRAIN_CLASSES)
    palette = tuple(colour for _, _, colour in _TRAIN_CLASSES)
    id_mapping = _id_mapping()
    splits = ("train", "val")
    known_splits = ("train", "val", "test")

    def samples(self, split: str) -> Iterator[SampleRef]:
        """Every ``*_leftImg8bit.png`` of ``split``, sorted by sample id, each with its expected label path.

        Raises:
            ValueError: ``split`` is not one of ``known_splits``.
            FileNotFoundError: ``leftImg8bit/<split>`` is not a folder.
        """
        folder = self.split_folder(split, f"leftImg8bit/{split}")
        refs = []
        for city in (path for path in folder.iterdir() if path.is_dir()):
            for image in city.glob(f"*{IMAGE_SUFFIX}"):
                stem = image.name.removesuffix(IMAGE_SUFFIX)
                label = f"gtFine/{split}/{city.name}/{stem}{LABEL_SUFFIX}"
                refs.append(SampleRef(stem, split, image.relative_to(self.root).as_posix(), label))
        return iter(sorted(refs, key=lambda ref: ref.sample_id))
