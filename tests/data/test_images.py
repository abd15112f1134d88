"""Image preparation: every mode to 8-bit RGB, orientation, size rules, deterministic encode,
and every bad file a Skip with its reason. `zoo` (tests/data/conftest.py) holds the files."""
import io

import numpy as np
import pytest
from PIL import Image

from data_tools.errors import DataError, Skip
from data_tools.images import ImageOptions, prepare_image, prepare_image_file


def decoded(encoded):
    image = Image.open(io.BytesIO(encoded.data))
    image.load()
    return image


@pytest.mark.parametrize("name", ["truncated.jpg", "zero.jpg", "random.jpg", "bomb.png",
                                  "missing.jpg"])
def test_bad_images_are_skips_with_their_reason(zoo, name):
    path, reason = zoo[name]
    with pytest.raises(Skip) as caught:
        prepare_image_file(path, ImageOptions())
    assert caught.value.reason == reason
    assert str(path) in caught.value.detail


@pytest.mark.parametrize("name, rgb", [
    ("cmyk.jpg", (0, 255, 255)),
    ("gray.png", (77, 77, 77)),
    ("gray_alpha.png", (255, 255, 255)),
    ("rgba.png", (255, 255, 255)),
    ("palette.png", (0, 0, 255)),
    ("palette_transparent.png", (255, 255, 255)),
    ("gray16.png", (128, 128, 128)),   # 32768 / 65535 of full scale, not clipped to 255
])
def test_every_mode_becomes_rgb_with_the_right_colour(zoo, name, rgb):
    encoded = prepare_image_file(zoo[name][0], ImageOptions(format="png"))
    image = decoded(encoded)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == pytest.approx(rgb, abs=3)
    assert (encoded.width, encoded.height) == (64, 48) == image.size


def test_shorter_side_goes_down_to_max_size_and_never_up(zoo):
    big = prepare_image_file(zoo["rgb.jpg"][0], ImageOptions(max_size=150))
    assert (big.width, big.height) == (200, 150) == decoded(big).size
    assert (big.original_width, big.original_height) == (400, 300)
    small = prepare_image_file(zoo["small.png"][0], ImageOptions(max_size=150))
    assert (small.width, small.height) == (40, 30) == decoded(small).size
    kept = prepare_image_file(zoo["rgb.jpg"][0], ImageOptions(max_size=0))
    assert decoded(kept).size == (400, 300)


def test_exif_orientation_is_applied(zoo):
    encoded = prepare_image_file(zoo["exif_rotated.jpg"][0], ImageOptions(format="png"))
    image = decoded(encoded)
    assert image.size == (40, 60) == (encoded.original_width, encoded.original_height)
    # rotating 90 degrees clockwise moves the red top-left corner to the top right
    assert image.getpixel((35, 4))[0] > 200 and image.getpixel((4, 4))[2] > 200


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encoding_is_deterministic_and_in_the_asked_format(zoo, fmt):
    options = ImageOptions(format=fmt, max_size=100)
    first = prepare_image_file(zoo["rgb.jpg"][0], options)
    assert first.data == prepare_image_file(zoo["rgb.jpg"][0], options).data
    assert first.ext == fmt
    assert decoded(first).format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert not decoded(first).info.get("exif")


def test_max_pixels_and_min_size_are_configurable(zoo):
    data = zoo["rgb.jpg"][0].read_bytes()
    with pytest.raises(Skip, match="decompression_bomb"):
        prepare_image(data, ImageOptions(max_pixels=400 * 300 - 1))
    with pytest.raises(Skip, match="image_too_small"):
        prepare_image(zoo["small.png"][0].read_bytes(), ImageOptions(min_size=31))


def test_jpeg_draft_decoding_matches_full_decoding_closely(zoo):
    """Draft mode (decode at 1/2..1/8 scale) must not change the picture, only the speed."""
    data = zoo["rgb.jpg"][0].read_bytes()
    fast = np.asarray(decoded(prepare_image(data, ImageOptions(max_size=75, format="png"))),
                      dtype=float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((100, 75), Image.BICUBIC)
    assert fast.shape == (75, 100, 3)
    assert np.abs(fast - np.asarray(full, dtype=float)).mean() < 25


@pytest.mark.parametrize("kwargs", [{"format": "gif"}, {"quality": 0}, {"max_size": -1}])
def test_bad_options_are_data_errors(kwargs):
    with pytest.raises(DataError):
        ImageOptions(**kwargs)
