#!/usr/bin/env python
"""Pack person-retrieval data into webdataset shards (format: docs/DATA.md).

    python data_prep/make_shards.py SOURCE --output OUT [options]
    python data_prep/make_shards.py verify OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import shards
from common.fsio import get_fs, is_local, write_atomic
from data_prep.records import Drops, PrepError
from data_prep.sources import OUTPUT_OPTIONS, SOURCES, Source


def _add_source(sub, source: Source) -> None:
    p = sub.add_parser(source.name, help=source.help, description=source.description)
    for o in source.options:
        p.add_argument(*o.flags, **o.kwargs)
    g = p.add_argument_group("output")
    for o in OUTPUT_OPTIONS:
        g.add_argument(*o.flags, **o.kwargs)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of SOURCES, then the two that read shards instead of writing them."""
    ap = argparse.ArgumentParser(prog="make_shards.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for source in SOURCES.values():
        _add_source(sub, source)

    p = sub.add_parser("index", help="write sizes.json (sample count per shard) into a folder of webdataset "
                                     "shards made by another tool, so the trainer need not count them at start")
    p.add_argument("output", metavar="DIR", help="folder (local or fsspec URL) holding *.tar shards")

    p = sub.add_parser("verify", help="check shards against manifest.json and print statistics")
    p.add_argument("output", help="output directory or URL written by make_shards.py")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    return ap


def run(args, command) -> int:
    drops = Drops(strict=args.strict)
    if args.drops_file:
        _check_drops_file(args)
    try:
        return _run(args, command, drops)
    finally:
        if args.drops_file:
            _write_drops(args.drops_file, drops)


def _run(args, command, drops) -> int:
    from data_prep.writer import summary, write_dataset

    entries, loader = SOURCES[args.source].prepare(args, drops)
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
    # by temp file + rename: a link at the path is replaced, never written through
    data = "".join(json.dumps(r, ensure_ascii=False, default=str, sort_keys=True) + "\n" for r in drops.records)
    try:
        write_atomic(*get_fs(os.path.abspath(path)), data.encode("utf-8"))
    except OSError as e:
        raise PrepError(f"--drops-file {path}: cannot write ({type(e).__name__}: {e.strerror or e})") from e
    print(f"dropped records listed in {path} ({len(drops.records)})", file=sys.stderr)


def _local_path(url) -> str | None:
    fs, path = get_fs(url)
    return os.path.realpath(path) if is_local(fs) else None


def _check_drops_file(args) -> None:
    """--drops-file is written over: refused (before anything is written) when it is an input (an --annotations file,
    anything under --images) or a file of the output (its manifest.json, anything in its split folders)."""
    given = os.path.abspath(args.drops_file)
    if os.path.isdir(given):
        raise PrepError(f"--drops-file {args.drops_file}: is a folder; give a file name")
    # the path itself and, when it is a link, what it leads to
    paths = {os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given)), os.path.realpath(given)}
    options = vars(args)
    annotations = options.get("annotations") or []
    for flag, url in [*(("--annotations", a) for a in ([annotations] if isinstance(annotations, str) else annotations)),
                      ("--images", options.get("images")), ("--output", args.output)]:
        root = _local_path(url) if url else None
        clash = next((p for p in paths if root and (p == root or p.startswith(root.rstrip(os.sep) + os.sep))), None)
        if clash is None:
            continue
        rel = os.path.relpath(clash, root)
        if flag == "--output" and os.sep not in rel and rel not in (".", shards.MANIFEST_FILE):
            continue  # a file of its own beside the split folders
        what = "is" if rel == "." else f"lies in {'the output' if flag == '--output' else 'the input'}"
        raise PrepError(f"--drops-file {args.drops_file}: {what} {flag} {url}{'' if rel == '.' else f' ({rel})'}: "
                        f"it must not overwrite an input or a file of the output; give a path outside the inputs "
                        f"and the output's folders")


def index(directory: str) -> int:
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
