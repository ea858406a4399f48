"""COCO-Stuff 164k (COCO 2017 images with the ``stuffthingmaps_trainval2017`` label maps).

Layout under ``root``, as the COCO-Stuff instructions unzip it::

    images/{train2017,val2017}/<12-digit image id>.jpg
    annotations/{train2017,val2017}/<12-digit image id>.png

Label maps hold the 0-based COCO category id (things 0..89, stuff 91..181) and 255 for unlabelled. Of the
182 ids, the 11 thing ids COCO never uses (street sign, hat, shoe, eye glasses, plate, mirror, window, desk,
door, blender, hair brush) are absent; the other 171 are renumbered densely 0..170 in order, which is the
customary 171-class train id set. A value among the unused 11 is an error. The palette is the one customary
in segmentation code bases (mmsegmentation's); it repeats a few colours.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.data.sources.base import IGNORE_INDEX, DatasetSource, SampleRef

SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
NUM_RAW_IDS = 182  # 0..181: COCO category ids 1..182 minus one
# COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91: defined in the 2014 paper, never annotated
UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road",
    "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other",
    "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

PALETTE = (
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224), (0, 192, 192),
    (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224), (0, 0, 64), (0, 160, 192),
    (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224), (0, 0, 192), (128, 160, 192), (128, 128, 0),
    (128, 0, 32), (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0), (192, 128, 160),
    (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0), (192, 128, 32), (128, 96, 128),
    (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160), (0, 96, 128), (128, 128, 128),
    (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32), (128, 96, 0), (128, 0, 192), (0, 128, 32),
    (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0), (0, 128, 192), (0, 128, 160), (192, 224, 0),
    (0, 128, 64), (128, 128, 32), (192, 32, 128), (0, 64, 192), (0, 0, 32), (64, 160, 128), (128, 64, 64),
    (128, 0, 160), (64, 32, 128), (128, 192, 192), (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96),
    (192, 32, 0), (128, 64, 128), (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0),
    (0, 192, 128), (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128),
    (64, 0, 96), (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128), (64, 0, 224),
    (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192), (0, 128, 96), (0, 224, 0),
    (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0), (64, 192, 64),
    (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224),
    (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32),
    (128, 32, 64), (192, 0, 128), (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64),
    (64, 128, 128), (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192),
    (64, 0, 128), (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192), (0, 192, 160),
    (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192), (0, 64, 32),
    (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192), (0, 64, 160),
    (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128), (64, 192, 96),
    (64, 160, 64), (64, 64, 0),
)


def _id_mapping() -> dict[int, int]:
    used = [raw for raw in range(NUM_RAW_IDS) if raw not in UNUSED_IDS]
    return {**{raw: train_id for train_id, raw in enumerate(used)}, IGNORE_INDEX: IGNORE_INDEX}


class COCOStuffSource(DatasetSource):
    """COCO-Stuff 164k: 171 classes (80 things, 91 stuff); splits train/val (folders train2017/val2017).

    Sample ids are the file stems (the 12-digit COCO image id), unique across splits.
    """

    name = "cocostuff"
    classes = CLASSES
    palette = PALETTE
    id_mapping = _id_mapping()
    splits = ("train", "val")
    known_splits = tuple(SPLIT_FOLDERS)

    def samples(self, split: str) -> Iterator[SampleRef]:
        """Every ``images/<folder>/*.jpg`` of ``split``, sorted by sample id, with its expected label path.

        Raises:
            ValueError: ``split`` is not train or val.
            FileNotFoundError: the split's image folder is missing.
        """
        images = f"images/{SPLIT_FOLDERS.get(split, split)}"
        labels = f"annotations/{SPLIT_FOLDERS.get(split, split)}"
        return self.paired_samples(split, images, labels, "*.jpg")
