"""Fixtures of tests/data: a bad-input image zoo and a COCO-format captions file over it."""
import json

import pytest

from tests.helpers.shards import write_image_zoo

GOOD = ["rgb.jpg", "small.png", "cmyk.jpg", "gray.png", "gray_alpha.png", "rgba.png",
        "palette.png", "palette_transparent.png", "gray16.png", "exif_rotated.jpg"]
BAD = {"truncated.jpg": "truncated_image", "zero.jpg": "empty_image",
       "random.jpg": "corrupt_image", "bomb.png": "decompression_bomb",
       "missing.jpg": "missing_image"}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return write_image_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def coco_fixture(zoo, tmp_path):
    """captions.json over the zoo: good images with two captions each (one of them blank),
    bad images, a duplicate id, an image whose captions are all blank, one with none, one
    entry without file_name, and a caption naming an unknown image. Returns (json path,
    image folder, expected written, expected skipped counts)."""
    folder = next(iter(zoo.values()))[0].parent
    images, annotations = [], []

    def add(image_id, file_name, *captions):
        images.append({"id": image_id, "file_name": file_name, "width": 1, "height": 1})
        for caption in captions:
            annotations.append({"id": len(annotations) + 100, "image_id": image_id,
                                "caption": caption})

    for number, name in enumerate(GOOD + list(BAD), start=1):
        add(number, name, f"  picture number {number} ", "   ")
    add(1, "rgb.jpg", "a duplicate of image 1")
    add(50, "rgb.jpg", "", " \n ")            # every caption blank
    add(51, "small.png")                      # no caption at all
    images.append({"id": 52})                 # no file_name
    annotations.append({"id": 999, "image_id": 4242, "caption": "orphan"})
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    skipped = {reason: 1 for reason in BAD.values()}
    skipped.update(duplicate_id=1, empty_caption=1, missing_caption=1, malformed_entry=1,
                   annotation_without_image=1)
    return path, folder, len(GOOD), skipped
