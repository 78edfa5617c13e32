"""Loading and checking image files: JPEG bytes pass through untouched, anything else is encoded once as JPEG 95."""
from __future__ import annotations

import io
import os

from PIL import Image, ImageOps

from common.fsio import is_local, join

JPEG_MAGIC = b"\xff\xd8\xff"


EXIF_ORIENTATION = 0x0112


def check_or_encode(data: bytes, max_side: int = 0, background=(255, 255, 255)) -> tuple[bytes | None, str | None]:
    """(jpeg_bytes, None) or (None, drop_reason).

    An RGB or greyscale JPEG that needs no rotation and fits ``max_side`` passes through byte for byte; it is decoded
    in PIL's draft mode (DCT scaled to 1/8): the whole entropy-coded stream is still parsed, so truncated or corrupt
    files are caught, at a fraction of the cost of a full decode. Anything else is decoded, turned upright by its
    EXIF orientation, converted to RGB (an alpha channel composited on ``background``; CMYK converted), shrunk so
    that its longer side is at most ``max_side`` (0: no limit), and encoded once as JPEG 95."""
    if not data:
        return None, "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fits = not max_side or max(w, h) <= max_side
            if im.format == "JPEG" and data[:3] == JPEG_MAGIC and im.mode in ("RGB", "L") and fits \
                    and im.getexif().get(EXIF_ORIENTATION, 1) == 1:
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
                return data, None
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im), background)
        if not fits:
            scale = max_side / max(w, h)
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                             Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), None
    except Image.DecompressionBombError:
        return None, "decompression_bomb"  # more pixels than PIL's guard allows: a hostile or broken file
    except Exception:  # PIL raises many types for bad files; all mean the same to us
        return None, "unreadable_image"


def _to_rgb(im: Image.Image, background) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


class FileImageLoader:
    """Picklable worker callable: Entry -> (jpeg_bytes | None, drop_reason | None, captions).

    Symlinks: an image path is resolved on a local root and must stay inside the root's own real path; a link that
    leads outside is dropped as ``path_escapes_root`` (the same rule as '..' in an annotation)."""

    def __init__(self, fs, root: str, max_side: int = 0, background=(255, 255, 255)):
        self.fs, self.root, self.max_side, self.background = fs, root, max_side, tuple(background)
        self.local = is_local(fs)
        self.real_root = os.path.realpath(root) if self.local else None
        self._real_dirs: dict[str, str] = {}  # a folder's real path, resolved once (datasets keep many per folder)

    def _real(self, path: str) -> str:
        """os.path.realpath(path) for a path without '.' / '..' parts (records.safe_relpath keeps them out)."""
        if os.path.islink(path):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        real_folder = self._real_dirs.get(folder)
        if real_folder is None:
            real_folder = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real_folder, name)

    def __call__(self, entry):
        path = join(self.root, entry.image)
        if self.local:
            real = self._real(path)
            if real != self.real_root and not real.startswith(self.real_root + os.sep):
                return None, "path_escapes_root", entry.captions
        try:
            data = _read_local(path) if self.local else self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError):
            return None, "missing_image", entry.captions
        except OSError:
            return None, "unreadable_image", entry.captions
        jpg, reason = check_or_encode(data, self.max_side, self.background)
        return jpg, reason, entry.captions


def _read_local(path: str) -> bytes:
    # fsspec's local cat_file wraps the file in its own opener (~6 us more per image than open())
    with open(path, "rb") as f:
        return f.read()
