"""Decoding images defensively: edge sites see truncated uploads, wrong formats and huge files.

Every image the project reads goes through :func:`decode_image`, so a bad file always becomes an
:class:`ImageError` with a reason a person can act on, never a crash deep inside training or serving.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression bombs: refuse absurd pixel counts before decoding them.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason."""


def _read_bytes(source: bytes | str | Path, max_bytes: int | None) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        data = read_regular_file(Path(source), max_bytes)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"too large: {len(data)} bytes > limit {max_bytes}")
    if not data:
        raise ImageError("empty file")
    return data


def read_regular_file(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of a regular file, never following a symlink and never reading past ``max_bytes``.

    A link could point anywhere on the host (and its target would be uploaded as a sample); a FIFO or a
    device would block or never end. Both are refused before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("a symbolic link (links are not followed)") from None
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ImageError(f"too large: {info.st_size} bytes > limit {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def decode_image(source: bytes | str | Path, size: int, max_bytes: int | None = None,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file or its bytes to a ``size`` x ``size`` uint8 grayscale array.

    The canvas size comes from the header: more than ``max_pixels`` is refused before a pixel is decoded
    (a PNG of a few hundred bytes can declare 60000 x 60000)."""
    data = _read_bytes(source, max_bytes)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ImageError(f"too many pixels: {image.width}x{image.height}")
            image.load()  # forces a full decode: truncated files fail here, not later
            gray = image.convert("L")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # Pillow's plugins raise what they like (NotImplementedError, struct.error, ...)
        raise ImageError(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grayscale array (lossless, so a sample's hash is stable)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
