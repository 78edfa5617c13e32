#!/usr/bin/env python
"""Pack person-retrieval data into webdataset shards (format: docs/DATA.md).

    python data_prep/make_shards.py SOURCE --output OUT [options]
    python data_prep/make_shards.py verify OUT
"""
from __future__ import annotations

import argparse
import json
import sys

from common.fsio import get_fs
from data_prep.images import FileImageLoader
from data_prep.readers import READERS
from data_prep.records import Drops, PrepError

DATASET_HELP = {
    "cuhkpedes": "CUHK-PEDES reid_raw.json: [{split, captions, file_path, id, processed_tokens?}]",
    "icfgpedes": "ICFG-PEDES (same schema as CUHK-PEDES; train/test only)",
    "rstpreid": "RSTPReid data_captions.json: [{id, img_path, captions, split}]",
    "tbps": "one JSON list per split [{file_path, id, captions, captions_bt?}]: --annotations train.json "
            "--annotations test.json ..., or --annotations DIR holding train.json/val.json/test.json",
    "generated": "text-to-image output: [{id, image_path, caption}], one caption per record",
    "csv": "ZeroVL-style table with columns image, image_id, caption, caption_id (one row per caption)",
}


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


def _common(p):
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", required=True, help="output directory or fsspec URL (memory://, s3://...)")
    g.add_argument("--maxcount", type=_positive, default=1000, help="samples per shard (default 1000)")
    g.add_argument("--maxsize", type=_positive, default=int(1e9), help="max bytes per shard (default 1e9)")
    g.add_argument("--workers", type=int, default=1, help="processes for image loading/generation and shard "
                   "packing; the output does not depend on it (default 1)")
    g.add_argument("--overwrite", action="store_true", help="rewrite every shard even if an identical one exists")
    g.add_argument("--strict", action="store_true", help="fail on the first bad record instead of dropping it")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--drops-file", default=None,
                   help="write every dropped record (reason, file, record index, field, detail, split) to this file "
                        "as JSON lines, also when the run fails")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="make_shards.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("synthetic", help="procedural pedestrians with identities and captions")
    p.add_argument("--num-ids", type=_positive, default=1000, help="identities (default 1000)")
    p.add_argument("--images-per-id", type=_positive, default=4, help="images per identity (default 4)")
    p.add_argument("--captions-per-image", type=_positive, default=2, help="captions per image (default 2)")
    p.add_argument("--height", type=_positive, default=256, help="image height (default 256)")
    p.add_argument("--width", type=_positive, default=128, help="image width (default 128)")
    p.add_argument("--seed", type=int, default=0, help="everything derives from it (default 0)")
    p.add_argument("--val-frac", type=_frac, default=0.1, help="fraction of identities in val (default 0.1)")
    p.add_argument("--test-frac", type=_frac, default=0.1, help="fraction of identities in test (default 0.1)")
    _common(p)

    for name, desc in DATASET_HELP.items():
        p = sub.add_parser(name, help=desc, description=desc)
        if name == "tbps":
            p.add_argument("--annotations", required=True, action="append",
                           help="train.json/val.json/test.json (repeat) or a directory holding them")
        else:
            p.add_argument("--annotations", required=True, help="annotation file (path or fsspec URL)")
        p.add_argument("--images", required=True, help="image root the annotation paths are relative to")
        p.add_argument("--encoding", default="utf-8",
                       help="text encoding of the annotation file (default utf-8; e.g. latin-1, cp1252)")
        p.add_argument("--max-side", type=int, default=0,
                       help="shrink images whose longer side exceeds this (re-encoded as JPEG 95; default 0: keep)")
        p.add_argument("--alpha-background", type=_rgb, default=(255, 255, 255), metavar="R,G,B",
                       help="colour transparent pixels are composited on (default 255,255,255)")
        if name in ("generated", "csv"):
            p.add_argument("--split", default="train", help="split to write (the file has none; default train)")
        if name == "csv":
            p.add_argument("--id-column", default="image_id",
                           help="column holding the identity (default image_id: every image its own identity)")
            p.add_argument("--sep", default=None, help="column separator (default ',' or tab for .tsv)")
        _common(p)

    p = sub.add_parser("index", help="write sizes.json (sample count per shard) into a folder of webdataset "
                                     "shards made by another tool, so the trainer need not count them at start")
    p.add_argument("output", metavar="DIR", help="folder (local or fsspec URL) holding *.tar shards")

    p = sub.add_parser("verify", help="check shards against manifest.json and print statistics")
    p.add_argument("output", help="output directory or URL written by make_shards.py")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    return ap


def run(args, command) -> int:
    drops = Drops(strict=args.strict)
    try:
        return _run(args, command, drops)
    finally:
        if args.drops_file:
            _write_drops(args.drops_file, drops)


def _run(args, command, drops) -> int:
    from data_prep.writer import summary, write_dataset

    if args.source == "synthetic":
        from data_prep.synthetic import SyntheticRenderer, synthetic_entries

        if args.val_frac + args.test_frac >= 1:
            raise PrepError("--val-frac + --test-frac must be < 1")
        entries = synthetic_entries(args.num_ids, args.images_per_id, args.seed, args.val_frac, args.test_frac)
        loader = SyntheticRenderer(args.seed, args.height, args.width, args.captions_per_image)
    else:
        kw = {k: getattr(args, k) for k in ("split", "id_column", "sep", "encoding") if hasattr(args, k)}
        entries = READERS[args.source](args.annotations, drops, **kw)
        fs, root = get_fs(args.images)
        if not fs.isdir(root):  # a typo or an unmounted disk: every image would be dropped as missing
            raise PrepError(f"--images {args.images}: no such directory (nothing in {args.output} was changed)")
        loader = FileImageLoader(fs, root, args.max_side, args.alpha_background)
    if not entries:
        example = ""
        if drops.records:  # name the field: a wrong source type shows up as the same field missing everywhere
            from collections import Counter
            (reason, field), _ = Counter((r["reason"], r["field"]) for r in drops.records).most_common(1)[0]
            first = next(r for r in drops.records if (r["reason"], r["field"]) == (reason, field))
            example = (f"; most often {reason} of field '{field}' (first: record {first['record']}"
                       f"{', ' + first['detail'] if first['detail'] else ''}). Is {args.source!r} the right "
                       f"source type for this file? --drops-file lists every record")
        raise PrepError(f"{getattr(args, 'annotations', args.source)}: no usable records "
                        f"(dropped: {drops.as_dict()}){example}")
    opts = {k: v for k, v in vars(args).items()}
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        manifest = write_dataset(args.output, entries, loader, drops, opts, command, progress)
    except OSError as e:  # unwritable or full output: what was there before is untouched (staging is dropped)
        raise PrepError(f"--output {args.output}: cannot write ({type(e).__name__}: {e.strerror or e}); "
                        f"nothing there was changed") from e
    print(summary(manifest))
    if drops.total.get("non_utf8_text") and getattr(args, "encoding", "utf-8") == "utf-8":
        print(f"note: {drops.total['non_utf8_text']} caption(s)/field(s) were not UTF-8: if the annotation file is "
              f"in another encoding, give it with --encoding (e.g. latin-1)")
    return 0


def _write_drops(path: str, drops) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in drops.records:
            f.write(json.dumps(r, ensure_ascii=False, default=str, sort_keys=True) + "\n")
    print(f"dropped records listed in {path} ({len(drops.records)})", file=sys.stderr)


def index(directory: str) -> int:
    from common import shards
    try:
        urls = shards.resolve(directory)
        sizes = {shards.basename(u): shards.count_samples(u) for u in urls}
    except shards.ShardError as e:
        raise PrepError(str(e)) from e
    if not shards.write_sizes(directory, sizes):
        raise PrepError(f"{directory}: cannot write {shards.SIZES_FILE} there (a URL or a read-only folder)")
    print(f"{shards.join(directory, shards.SIZES_FILE)}: {len(sizes)} shards, {sum(sizes.values())} samples")
    return 0


def main(argv=None) -> int:
    command = list(sys.argv) if argv is None else ["data_prep/make_shards.py", *argv]
    args = build_parser().parse_args(argv)
    try:
        if args.source == "verify":
            from data_prep.verify import verify

            problems, report = verify(args.output, decode=not args.no_decode)
            print(report)
            if problems:
                print(f"FAILED: {len(problems)} problem(s)", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            print("OK")
            return 0
        if args.source == "index":
            return index(args.output)
        return run(args, command)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted before {args.output} was complete (what this run had staged was removed); run the "
              f"same command again to finish: shards already in place are checked and reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
