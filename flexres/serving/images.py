"""Request images: bytes of any format Pillow reads -> a uint8 RGB tensor, with the limits and errors a server needs.

No web framework here: the inference child process decodes with it too.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from .errors import RequestError

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 40_000_000
DRAFT_ABOVE_PIXELS = 4_000_000


def first_bytes(data: bytes, count: int = 8) -> str:
    """The start of an upload as a person reads it: its text when that is printable ASCII (an HTML error page, a
    JSON body), else its bytes in hex; never Python's b'...' repr."""
    head = data[:count]
    if all(32 <= b < 127 for b in head):
        return f"the text '{head.decode('ascii')}'"
    return f"the bytes {head.hex(' ')} (hex)"


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, shortest: int | None = None) -> Tensor:
    """Bytes of any image Pillow reads -> uint8 3 x H x W RGB, refusing what is not an image or is too large.

    ``shortest`` lets the JPEG decoder scale down while decoding (Pillow's draft mode) images over
    ``DRAFT_ABOVE_PIXELS``: a 12-MP photo served at 224 px need not be decoded at full size first. It keeps at least
    twice ``shortest`` on the short side, and smaller images decode exactly, as `flexres predict` decodes them.
    """
    if not data:
        raise RequestError(400, "empty body: send an image as the multipart field 'file' or as the raw request body")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(
            415, f"not an image Pillow can read ({len(data)} bytes; starts with {first_bytes(data)})"
        ) from None
    except Image.DecompressionBombError as e:  # Pillow's own guard, far above any sane limit
        raise RequestError(413, f"image too large: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise RequestError(
            413, f"image of {w} x {h} = {w * h / 1e6:.1f} MP is over the limit of {max_pixels / 1e6:.1f} MP"
        )
    if shortest and im.format == "JPEG" and w * h > DRAFT_ABOVE_PIXELS:
        im.draft("RGB", (2 * shortest, 2 * shortest))
    try:
        return pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise RequestError(415, f"cannot decode the image: {e}") from None
