"""Loading and checking image files: JPEG bytes pass through untouched, anything else is encoded once as JPEG 95."""
from __future__ import annotations

import io

from PIL import Image

from .fsio import join

JPEG_MAGIC = b"\xff\xd8\xff"


def check_or_encode(data: bytes) -> tuple[bytes | None, str | None]:
    """(jpeg_bytes, None) or (None, drop_reason).

    JPEGs are decoded in PIL's draft mode (DCT scaled to 1/8): the whole entropy-coded stream is still parsed, so
    truncated or corrupt files are caught, at a fraction of the cost of a full decode."""
    if not data:
        return None, "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and data[:3] == JPEG_MAGIC:
                w, h = im.size
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
                return data, None
            im.load()
            rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), None
    except Exception:  # PIL raises many types for bad files; all mean the same to us
        return None, "unreadable_image"


class FileImageLoader:
    """Picklable worker callable: Entry -> (jpeg_bytes | None, drop_reason | None, captions)."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def __call__(self, entry):
        path = join(self.root, entry.image)
        try:
            data = self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return None, "missing_image", entry.captions
        except OSError:
            return None, "unreadable_image", entry.captions
        jpg, reason = check_or_encode(data)
        return jpg, reason, entry.captions
