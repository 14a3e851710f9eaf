"""Perceptual hashes: recognise a near-copy of an exam image (re-encoded, resized, slightly cropped) without
the image itself ever leaving its site.

A hash is the sign pattern of the 12 x 12 lowest DCT frequencies (the constant one left out: 143 bits) of the
image shrunk to 32 x 32 grey pixels, against their median (the classic "pHash" of Zauner, 2010, with a larger
block: ELPV cells all look alike, and 63 bits could not tell 7 % of distinct cells apart). Shrinking and the
low frequencies make it indifferent to JPEG and to resizing; a crop shifts every frequency, so a site
publishes the hashes of its exam image centre-cropped by 0 to 8 % (in 1 % steps) too, and a copy matches when
it is within :data:`MAX_DISTANCE` bits of any of them.

Measured on ELPV (``bench/exam_copies.py``, 400 exam cells, 3 seeds): JPEG (q70) and resized copies are caught
99 % of the time, centre crops of 3 % and 6 % 94 % and 98 %; a crop off the centre is not caught (0.2 %). A
distinct cell lies within 8 bits of one of the 400 exam cells 2.3 % of the time: held back, never lost.
"""

from __future__ import annotations

import re

import numpy as np

SIDE = 32
BLOCK = 12
BITS = BLOCK * BLOCK - 1
HEX_CHARS = (BITS + 3) // 4
CROPS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)
MAX_DISTANCE = 8
DECODE_SIZE = 256  # sites and the cloud hash an image decoded at this size
_HEX = re.compile(r"[0-9a-f]+")


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))
    m[0] /= np.sqrt(2)
    return m * np.sqrt(2 / n)


_DCT = _dct_matrix(SIDE)[:BLOCK]


def _shrink(pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("L")
    return np.asarray(image.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float64)


def phash_bits(pixels: np.ndarray) -> np.ndarray:
    """The 143 hash bits of an HxW uint8 image."""
    low = (_DCT @ _shrink(pixels) @ _DCT.T).ravel()[1:]
    return low > np.median(low)


def phash(pixels: np.ndarray) -> str:
    """The hash as hex (36 characters)."""
    return np.packbits(np.concatenate([[False], phash_bits(pixels)])).tobytes().hex()


def centre_crop(pixels: np.ndarray, share: float) -> np.ndarray:
    h, w = pixels.shape[:2]
    dy, dx = int(round(h * share / 2)), int(round(w * share / 2))
    return pixels[dy:h - dy, dx:w - dx] if dy or dx else pixels


def exam_phashes(pixels: np.ndarray) -> list[str]:
    """What a site publishes for one exam image: the hashes of its centre crops (:data:`CROPS`)."""
    return sorted({phash(centre_crop(pixels, share)) for share in CROPS})


def as_bits(hashes: list[str]) -> np.ndarray:
    """Hex hashes as a (n, 143) bool array (ValueError for anything that is not one)."""
    for value in hashes:
        if not isinstance(value, str) or len(value) != HEX_CHARS or not _HEX.fullmatch(value):
            raise ValueError(f"not a perceptual hash: {str(value)[:60]!r}")
    packed = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(len(hashes), HEX_CHARS // 2)
    return np.unpackbits(packed, axis=1)[:, 1:].astype(bool)


def nearest(bits: np.ndarray, known: np.ndarray) -> int:
    """Bits by which ``bits`` differs from the nearest row of ``known`` (BITS + 1 when there is none)."""
    if not len(known):
        return BITS + 1
    return int((known != bits).sum(1).min())


def file_phashes(data: bytes) -> list[str]:
    """:func:`exam_phashes` of an image file's bytes (ImageError when it does not decode)."""
    from edge_agent.imaging import decode_image

    return exam_phashes(decode_image(data, DECODE_SIZE))


def sample_bits(data: bytes) -> np.ndarray | None:
    """The hash bits of a sample's image bytes, None when it does not decode."""
    from edge_agent.imaging import ImageError, decode_image

    try:
        return phash_bits(decode_image(data, DECODE_SIZE))
    except ImageError:
        return None
