"""What make_shards can pack: one ``Source`` per subcommand in ``SOURCES``. make_shards builds each subcommand, its
``--help`` and its run from the entry alone, so adding a source is a reader (readers.py) plus one entry here
(docs/DATA.md, "Adding a source")."""
from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass
from typing import Callable

from common.fsio import get_fs
from .images import FileImageLoader
from .readers import read_csv, read_cuhkpedes, read_generated, read_icfgpedes, read_rstpreid, read_tbps
from .records import PrepError

# The value checks keep their names: argparse names a converter that fails ("invalid _positive value: 'x'").


def _positive(v):
    n = int(float(v))
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _rgb(v):
    try:
        rgb = tuple(int(x) for x in v.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= x <= 255 for x in rgb):
        raise argparse.ArgumentTypeError("expected R,G,B with each value in 0..255, e.g. 255,255,255")
    return rgb


def _frac(v):
    f = float(v)
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError("must be in [0, 1)")
    return f


@dataclass(frozen=True)
class Option:
    """One command-line flag: the arguments of ``argparse.ArgumentParser.add_argument``."""
    flags: tuple[str, ...]
    kwargs: dict

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under (its own rule: the first long flag, '-' as '_')."""
        return self.kwargs.get("dest") or next(f for f in self.flags if f.startswith("--"))[2:].replace("-", "_")


def option(*flags: str, **kwargs) -> Option:
    return Option(flags, kwargs)


@dataclass(frozen=True)
class Source:
    """One subcommand of make_shards.py. ``prepare(args, drops)`` returns ``({split: [Entry]}, loader)``, where the
    loader is a picklable callable Entry -> (jpeg bytes or None, drop reason or None, captions) run in the workers."""
    name: str
    help: str                          # its line in `make_shards.py --help`
    options: tuple[Option, ...]        # its own flags, in --help order; OUTPUT_OPTIONS follow in every source
    prepare: Callable
    description: str | None = None     # heads its own --help


# Every source writes shards the same way.
OUTPUT_OPTIONS = (
    option("--output", "-o", required=True, help="output directory or fsspec URL (memory://, s3://...)"),
    option("--maxcount", type=_positive, default=1000, help="samples per shard (default 1000)"),
    option("--maxsize", type=_positive, default=int(1e9), help="max bytes per shard (default 1e9)"),
    option("--workers", type=int, default=1, help="processes for image loading/generation and shard "
           "packing; the output does not depend on it (default 1)"),
    option("--overwrite", action="store_true", help="rewrite every shard even if an identical one exists"),
    option("--strict", action="store_true", help="fail on the first bad record instead of dropping it"),
    option("--no-progress", action="store_true", help="no progress bars"),
    option("--drops-file", default=None,
           help="write every dropped record (reason, file, record index, field, detail, split) to this file "
                "as JSON lines, also when the run fails"),
)


# ------------------------------------------------------------------------------------------------ synthetic ---

SYNTHETIC_OPTIONS = (
    option("--num-ids", type=_positive, default=1000, help="identities (default 1000)"),
    option("--images-per-id", type=_positive, default=4, help="images per identity (default 4)"),
    option("--captions-per-image", type=_positive, default=2, help="captions per image (default 2)"),
    option("--height", type=_positive, default=256, help="image height (default 256)"),
    option("--width", type=_positive, default=128, help="image width (default 128)"),
    option("--seed", type=int, default=0, help="everything derives from it (default 0)"),
    option("--val-frac", type=_frac, default=0.1, help="fraction of identities in val (default 0.1)"),
    option("--test-frac", type=_frac, default=0.1, help="fraction of identities in test (default 0.1)"),
)


def _prepare_synthetic(args, drops):
    # imported here: numpy and the renderer are not needed to pack files
    from .synthetic import SyntheticRenderer, synthetic_entries

    if args.val_frac + args.test_frac >= 1:
        raise PrepError("--val-frac + --test-frac must be < 1")
    entries = synthetic_entries(args.num_ids, args.images_per_id, args.seed, args.val_frac, args.test_frac)
    return entries, SyntheticRenderer(args.seed, args.height, args.width, args.captions_per_image)


# ------------------------------------------------------------------------------------------ annotation files ---

ANNOTATIONS = option("--annotations", required=True, help="annotation file (path or fsspec URL)")
IMAGE_OPTIONS = (
    option("--images", required=True, help="image root the annotation paths are relative to"),
    option("--encoding", default="utf-8",
           help="text encoding of the annotation file (default utf-8; e.g. latin-1, cp1252)"),
    option("--max-side", type=int, default=0,
           help="shrink images whose longer side exceeds this (re-encoded as JPEG 95; default 0: keep)"),
    option("--alpha-background", type=_rgb, default=(255, 255, 255), metavar="R,G,B",
           help="colour transparent pixels are composited on (default 255,255,255)"),
)
SPLIT = option("--split", default="train", help="split to write (the file has none; default train)")


def _prepare_annotated(reader, reader_args: tuple[str, ...], args, drops):
    if "split" in reader_args and not re.fullmatch(r"\w[\w.-]*", args.split):
        # The split names the folder it is written to: '..', '/x' or 'a/b' would write outside --output.
        raise PrepError(f"--split {args.split!r}: must be a plain folder name (letters, digits, '_', '-', '.'; "
                        f"not starting with '.' or '-')")
    entries = reader(args.annotations, drops, **{k: getattr(args, k) for k in reader_args})
    fs, root = get_fs(args.images)
    if not fs.isdir(root):  # a typo or an unmounted disk: every image would be dropped as missing
        raise PrepError(f"--images {args.images}: no such directory (nothing in {args.output} was changed)")
    return entries, FileImageLoader(fs, root, args.max_side, args.alpha_background)


def annotated(name: str, help: str, reader, *reader_options: Option, annotations: Option = ANNOTATIONS) -> Source:
    """A source read from annotation files and an image folder: ``--annotations``, the image options, then the
    reader's own flags. The reader is called ``reader(annotations, drops, encoding=..., DEST=...)`` with the value of
    each of its own flags under the flag's dest."""
    reader_args = ("encoding", *(o.dest for o in reader_options))
    return Source(name, help, (annotations, *IMAGE_OPTIONS, *reader_options),
                  functools.partial(_prepare_annotated, reader, reader_args), description=help)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("synthetic", "procedural pedestrians with identities and captions", SYNTHETIC_OPTIONS,
           _prepare_synthetic),
    annotated("cuhkpedes", "CUHK-PEDES reid_raw.json: [{split, captions, file_path, id, processed_tokens?}]",
              read_cuhkpedes),
    annotated("icfgpedes", "ICFG-PEDES (same schema as CUHK-PEDES; train/test only)", read_icfgpedes),
    annotated("rstpreid", "RSTPReid data_captions.json: [{id, img_path, captions, split}]", read_rstpreid),
    annotated("tbps", "one JSON list per split [{file_path, id, captions, captions_bt?}]: --annotations train.json "
                      "--annotations test.json ..., or --annotations DIR holding train.json/val.json/test.json",
              read_tbps, annotations=option("--annotations", required=True, action="append",
                                            help="train.json/val.json/test.json (repeat) or a directory holding them")),
    annotated("generated", "text-to-image output: [{id, image_path, caption}], one caption per record",
              read_generated, SPLIT),
    annotated("csv", "ZeroVL-style table with columns image, image_id, caption, caption_id (one row per caption)",
              read_csv, SPLIT,
              option("--id-column", default="image_id",
                     help="column holding the identity (default image_id: every image its own identity)"),
              option("--sep", default=None, help="column separator (default ',' or tab for .tsv)")),
)}
