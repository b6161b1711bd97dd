"""Image probing with one error policy: size from the header, full decode, the decompression-bomb limit.

Every caller (ingest, the image_checks operator, pack, train, dedup) goes through `image_size` or
`decode_image`, so an image one accepts the others accept. The policy:
- the pixel limit is checked from the header, before any pixel is decoded (`MAX_PIXELS` = PIL's own
  `Image.MAX_IMAGE_PIXELS` default); PIL's bomb warning counts as over the limit too;
- every failure raises `ImageError` with a typed `problem` (`ImageProblem`), never a bare PIL error;
- `decode_image` reads the whole stream (a truncated file fails) and returns a loaded image.
Callers map the problem onto their own reject rule (ingest's `undecodable_image`, pack's
`image_undecodable`); the problem's value goes into the rejected row's meta as `image_problem`.
"""

from __future__ import annotations

import io
import struct
import warnings
from enum import StrEnum

from PIL import Image

MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS: more is treated as a decompression bomb
PNG_IHDR = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


class ImageProblem(StrEnum):
    """Why bytes are not a usable image."""

    NOT_AN_IMAGE = "not_an_image"  # empty, or no header PIL can read (foreign or cut inside the header)
    TOO_MANY_PIXELS = "too_many_pixels"  # width * height over the limit (a decompression bomb)
    BROKEN_DATA = "broken_data"  # the header reads but the pixel data is truncated or corrupt


class ImageError(ValueError):
    """Bytes that are not a usable image; `problem` says why, the message gives PIL's detail."""

    def __init__(self, problem: ImageProblem, detail: str = ""):
        super().__init__(f"{problem.value}: {detail}" if detail else problem.value)
        self.problem = problem


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (what PIL's header read returns), else None: PIL's
    `Image.open` costs ~100 us per image, this ~1 us (measured by pipeline/pack_job.py's caller)."""
    if len(data) < 24 or data[:16] != PNG_IHDR:
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w and h else None


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageError(ImageProblem.TOO_MANY_PIXELS, f"{w}x{h} is over {max_pixels} pixels")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """PIL's lazy open (header only) with the pixel limit applied; the caller runs it under `_strict`."""
    if not data:
        raise ImageError(ImageProblem.NOT_AN_IMAGE, "no bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(ImageProblem.TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # PIL raises many kinds for foreign bytes (UnidentifiedImageError, SyntaxError, ...)
        raise ImageError(ImageProblem.NOT_AN_IMAGE, str(e).split(" <_io.")[0] or type(e).__name__) from None
    _check_pixels(*img.size, max_pixels)
    return img


def image_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone (no pixel decoded); raises ImageError."""
    size = png_size(data)
    if size is not None:
        _check_pixels(*size, max_pixels)
        return size
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns, we refuse
        with _open(data, max_pixels) as img:
            return img.size


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(ImageProblem.TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # truncated streams raise OSError, corrupt ones OSError/SyntaxError/ValueError
        raise ImageError(ImageProblem.BROKEN_DATA, str(e) or type(e).__name__) from None


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image fully decoded (every byte of the stream read, so truncation fails); raises ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        _load(img)
    return img


def decode_draft(data: bytes, mode: str, side: int, max_pixels: int = MAX_PIXELS) -> tuple[tuple[int, int], Image.Image]:
    """(true size, the image decoded near `side` pixels in `mode`): JPEG decodes at 1/2..1/8 scale, still
    reading the whole stream, so it is as strict as `decode_image` for checks that need a thumbnail only."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        size = img.size
        img.draft(mode, (side, side))
        _load(img)
    return size, img


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`decode_image` converted to RGB (what tiling and pHash take); raises ImageError."""
    img = decode_image(data, max_pixels)
    try:
        return img.convert("RGB")
    except Exception as e:  # a mode PIL cannot convert (rare palette/CMYK corruptions)
        raise ImageError(ImageProblem.BROKEN_DATA, str(e) or type(e).__name__) from None
