"""Open, validate, convert, resize and encode one image; bad images become `Skip`s by reason.

Every image leaves as 8-bit RGB, upright (EXIF orientation applied), its shorter side at most
`max_size` (never upscaled), encoded as JPEG (default), PNG or WebP without metadata, so that the
same input always gives the same bytes.
"""
from __future__ import annotations

import argparse
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data_tools.errors import DataError, Skip

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 9459 x 9459)


@dataclass(frozen=True)
class ImageOptions:
    max_size: int = 256          # shorter side down to this; 0 keeps the size
    format: str = "jpg"          # one of FORMATS
    quality: int = 95            # JPEG / WebP quality (img2dataset's default)
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = 1            # images whose shorter side is below this are skipped

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"image format must be one of {sorted(FORMATS)}, got {self.format!r}")
        if self.max_size < 0 or not 1 <= self.quality <= 100 or self.max_pixels < 1:
            raise DataError(f"bad image options: max_size={self.max_size} "
                            f"quality={self.quality} max_pixels={self.max_pixels}")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("images")
    group.add_argument("--max-size", type=int, default=256,
                       help="shorter side down to this many pixels, never upscaled; 0 keeps "
                            "the size (default: %(default)s)")
    group.add_argument("--image-format", choices=sorted(FORMATS), default="jpg",
                       help="(default: %(default)s)")
    group.add_argument("--quality", type=int, default=95,
                       help="JPEG/WebP quality (default: %(default)s)")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="images with more pixels are skipped as decompression bombs "
                            "(default: %(default)s)")
    group.add_argument("--min-size", type=int, default=1,
                       help="skip images whose shorter side is smaller (default: %(default)s)")


def options_from_args(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(max_size=args.max_size, format=args.image_format, quality=args.quality,
                        max_pixels=args.max_pixels, min_size=args.min_size)


def read_image_file(path: Path) -> bytes:
    """The file's bytes, or a Skip saying why there are none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Skip("missing_image", str(path)) from None
    except OSError as e:
        raise Skip("unreadable_image", f"{path}: {e.strerror}") from None
    if not data:
        raise Skip("empty_image", str(path))
    return data


def open_image(data: bytes, options: ImageOptions,
               name: str = "") -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an upright 8-bit RGB image, reduced at decode time when the format allows;
    also return the original (width, height) after EXIF rotation, as a viewer shows it."""
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces Pillow's warning at its fixed threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > options.max_pixels:
                raise Skip("decompression_bomb", f"{name}: {width}x{height} pixels")
            original = (height, width) if _swaps_axes(image) else (width, height)
            if options.max_size and image.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale: much faster, still >= the target size
                image.draft("RGB", (options.max_size, options.max_size))
            image.load()
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip("decompression_bomb", f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise Skip("corrupt_image", f"{name}: not a recognised image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        raise Skip(reason, f"{name}: {e}") from None
    return to_rgb(ImageOps.exif_transpose(image)), original


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: transparency composited on white, 16/32-bit scaled (not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_shorter_side(image: Image.Image, max_size: int,
                        original: tuple[int, int] | None = None) -> Image.Image:
    """Shorter side down to max_size (never up). The aspect ratio comes from `original`, the
    size before JPEG draft decoding, whose rounding would otherwise shift it by a pixel."""
    width, height = original or image.size
    if not max_size or min(width, height) <= max_size:
        return image
    scale = max_size / min(width, height)
    size = (max(max_size, round(width * scale)), max(max_size, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_image(image: Image.Image, options: ImageOptions) -> bytes:
    buffer = io.BytesIO()
    if options.format == "png":
        image.save(buffer, "PNG", optimize=False)
    else:
        image.save(buffer, FORMATS[options.format], quality=options.quality)
    return buffer.getvalue()


def prepare_image(data: bytes, options: ImageOptions, name: str = "") -> EncodedImage:
    """Bytes of any image file -> the sample's image member (or Skip)."""
    image, original = open_image(data, options, name)
    if min(original) < options.min_size:
        raise Skip("image_too_small", f"{name}: {original[0]}x{original[1]}")
    image = resize_shorter_side(image, options.max_size, original)
    return EncodedImage(encode_image(image, options), options.format, image.size[0],
                        image.size[1], *original)


def prepare_image_file(path: Path, options: ImageOptions) -> EncodedImage:
    return prepare_image(read_image_file(path), options, str(path))


def _swaps_axes(image: Image.Image) -> bool:
    """EXIF orientations 5-8 rotate by 90 degrees."""
    return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
