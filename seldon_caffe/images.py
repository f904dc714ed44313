"""Decode a client's image file without letting a small file claim gigabytes.

A PNG of one flat colour compresses about 1000:1, so 100 KB on the wire can declare
10000x10000 pixels, which OpenCV would decode into hundreds of megabytes before a hook
could look at it. `decode_image` reads only the header first (Pillow's `Image.open` is
lazy: it parses the header and stops), rejects an image larger than the limit with a
400 that says both sizes, and only then decodes with OpenCV.

This is a module of its own, not part of `limits.py`: it imports OpenCV and Pillow, and
`limits.py` is read by every process of the service, including those that never see an
image.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BadRequest
from .limits import MAX_REQUEST_BYTES_ENV, max_request_bytes

# What the default pixel limit assumes one decoded pixel costs: 8-bit RGBA, the widest
# common case. With the default 64 MB request limit that allows 4096x4096.
BYTES_PER_PIXEL = 4


def default_max_pixels() -> int:
    """The pixel limit when a caller names none: an 8-bit RGBA image of that many pixels
    fills the request size limit ($SELDON_CAFFE_MAX_REQUEST_BYTES, default 64 MB -> 4096x4096)."""
    return max(1, max_request_bytes() // BYTES_PER_PIXEL)


def decode_image(
    data: bytes | bytearray | memoryview,
    flags: int = cv2.IMREAD_UNCHANGED,
    *,
    max_pixels: int | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """An image file's bytes -> the array `cv2.imdecode(data, flags)` gives, within limits.

    The header is read first, and the image rejected with BadRequest (HTTP 400, naming its
    size and the limit) when it has more than `max_pixels` pixels (None: `default_max_pixels()`,
    4096x4096 under the default 64 MB request limit) or a side longer than `max_side`
    (None: no limit per side). Bytes that are not an image file of a format Pillow knows
    (PNG, JPEG, BMP, TIFF, WebP, GIF, PNM...), or that OpenCV cannot decode, OpenCV's own
    limits included, are a 400 too: never a 500, never a None.
    """
    for name, value in (("max_pixels", max_pixels), ("max_side", max_side)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    pixels = default_max_pixels() if max_pixels is None else max_pixels
    side = math.isqrt(pixels)
    notes = [f"e.g. {side}x{side}"] if side * side == pixels else []
    if max_pixels is None:
        notes.append(f"{BYTES_PER_PIXEL} bytes a pixel within the request limit, ${MAX_REQUEST_BYTES_ENV}")
    limit = f"at most {pixels:,} pixels" + (f" ({'; '.join(notes)})" if notes else "")
    width, height = _header_size(data, limit)
    if width * height > pixels:
        raise BadRequest(f"the image is {width}x{height} ({width * height:,} pixels); this service takes {limit}")
    if max_side is not None and max(width, height) > max_side:
        raise BadRequest(f"the image is {width}x{height}; this service takes at most {max_side} pixels a side")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:  # e.g. over OpenCV's own limit, $OPENCV_IO_MAX_IMAGE_PIXELS
        reason = getattr(exc, "err", "") or str(exc).strip()
        raise BadRequest(f"OpenCV cannot decode the {width}x{height} image: {reason}") from None
    if image is None:
        raise BadRequest(f"the {len(data)} bytes sent are not an image OpenCV can decode (send a PNG or JPEG)")
    return image


def _header_size(data: bytes | bytearray | memoryview, limit: str) -> tuple[int, int]:
    """(width, height) from the image file's header alone."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (~179 million pixels) fires inside open; its message names the size.
        raise BadRequest(f"the image is too large ({exc}); this service takes {limit}") from None
    except UnidentifiedImageError:  # its message is only the BytesIO's repr: say it plainly
        raise BadRequest(f"the {len(data)} bytes sent are not an image file (send a PNG or JPEG)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # a header cut short or malformed
        raise BadRequest(
            f"the {len(data)} bytes sent are not an image file Pillow can read ({exc}); send a PNG or JPEG"
        ) from None
