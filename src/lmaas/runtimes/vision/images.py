"""Decoding untrusted encoded images (PNG, JPEG, GIF, WebP, BMP...) with Pillow, safely.

The pixel count is checked from the header before any pixel is decoded, so a small file that
declares a huge canvas (a decompression bomb) is refused without allocating it. Pillow's own
``Image.MAX_IMAGE_PIXELS`` is a process-wide setting and is left alone; its
``DecompressionBombError`` (raised at twice that limit) is mapped to the same 400.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from lmaas.core.errors import InvalidRequestError

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""About 6300 x 6300; far above what a classifier resizes down to, far below a bomb."""


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decode ``data`` into an RGB image (the first frame of an animation).

    Args:
        data: The encoded file.
        max_pixels: Largest ``width * height`` accepted.
        param: The request parameter named in errors (e.g. ``images[2]``).

    Raises:
        InvalidRequestError: empty, corrupt or unsupported data, or too many pixels.
    """
    if not data:
        raise InvalidRequestError(f"{param} is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"{param} is {width}x{height} pixels, more than the {max_pixels} allowed",
                    param=param,
                )
            image.load()
            return image.convert("RGB")
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(f"{param} is too large to decode: {exc}", param=param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "not a supported image format" if isinstance(exc, UnidentifiedImageError) else exc
        raise InvalidRequestError(f"{param} cannot be decoded: {reason}", param=param) from None
