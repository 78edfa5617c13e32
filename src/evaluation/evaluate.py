"""Text-to-image person retrieval evaluation: library entry points and the ``scripts/eval.sh`` command line.

The protocol itself (test sets, metrics, a model scored on test sets) is fast_clip/retrieval, which the trainer's
periodic validation uses too; this module is the command line around it: which weights, which data, the reports.

Command line::

    python -m evaluation.evaluate RUN_DIR [--data SPEC ...] [--epoch N]
    python -m evaluation.evaluate --pretrained FILE [--model NAME] [--image-size H W] --data SPEC ... --output DIR

A run folder's layout and the resolution of RUN_DIR / --pretrained to a file, a model and an image size are
common/runs.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
from typing import Mapping, Sequence

import torch

from common import runs, shards
from common.runs import CheckpointError
from fast_clip.retrieval.protocol import evaluate_model, evaluate_testset
from fast_clip.retrieval.testset import EvalError, TestSet, default_transform, load_test_set

__all__ = ["EvalError", "evaluate_model", "evaluate_testset", "cli", "default_datasets",
           "dataset_name", "format_table", "partial_notes", "write_report", "report_tag", "load_model",
           "resolve_weights", "pick_device", "check_image_size", "main"]

_SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}


def cli(run, build_parser):
    """A command line's ``main(argv)`` with the evaluation CLIs' one error rule: bad input (an EvalError, or a run
    folder / checkpoint / weights file that cannot be used) is one ``error:`` line and exit code 2, no traceback."""
    def main(argv: Sequence[str] | None = None) -> int:
        try:
            return run(build_parser().parse_args(argv))
        except (EvalError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return main


# ---------------------------------------------------------------------------------------------------- test data
def _pattern_dir(pattern: str) -> str:
    """Folder part of a shard pattern: the prefix before the first path component holding a brace or glob, or the
    folder of a file, or the folder itself."""
    parts = pattern.rstrip("/").split("/")
    for i, p in enumerate(parts):
        if any(c in p for c in "{*?["):
            return "/".join(parts[:i]) or "."
    if os.path.isdir(pattern):
        return pattern.rstrip("/")
    return os.path.dirname(pattern.rstrip("/")) or "."


def dataset_name(spec: str) -> str:
    """Display name of a shard spec: ``shards/cuhk/test`` -> ``cuhk``; ``lists/foo.txt`` -> ``foo``."""
    first = spec.split("::")[0]
    if os.path.isfile(first) and not shards.is_tar_name(first):
        return os.path.splitext(os.path.basename(first))[0]
    d = os.path.normpath(_pattern_dir(first))
    base = os.path.basename(d)
    if base in _SPLIT_NAMES:
        parent = os.path.basename(os.path.dirname(os.path.abspath(d)))
        return parent or base
    return base or "data"


def default_datasets(train_data: str | None) -> dict[str, str]:
    """The ``test/`` split next to each ``::``-separated training set: for ``ROOT/train/train-{..}.tar`` that is
    ``ROOT/test`` when it exists (local folders and URLs alike; pipe: sets have no folder)."""
    out: dict[str, str] = {}
    roots: list[str] = []
    for part in (train_data or "").split("::"):
        part = part.strip()
        if not part:
            continue
        try:
            files = shards.resolve(part)
        except shards.ShardError as e:
            print(f"warning: training set {part!r} cannot be resolved ({e}); no test split looked up for it",
                  file=sys.stderr)
            continue
        for f in files:
            if shards.is_pipe(f):
                continue
            root = shards.parent(shards.parent(f))
            if root not in roots:
                roots.append(root)
    for root in roots:
        test = shards.join(root or ".", "test")
        if shards.exists(test):
            name = shards.basename(root.rstrip("/")) if shards.is_url(root) else os.path.basename(os.path.abspath(root))
            out[_unique(out, name or "test")] = test
        else:
            print(f"warning: no test split at {test!r} for training data under {root!r}; skipped", file=sys.stderr)
    return out


def _unique(d: Mapping, name: str) -> str:
    if name not in d:
        return name
    i = 2
    while f"{name}_{i}" in d:
        i += 1
    return f"{name}_{i}"


def _parse_data(specs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name = None
        if "=" in spec and not os.path.exists(spec):
            head, rest = spec.split("=", 1)
            if head and "/" not in head:
                name, spec = head, rest
        out[_unique(out, name or dataset_name(spec))] = spec
    return out


# ----------------------------------------------------------------------------------------------------------- reports
def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _of(n: int, listed: int | None) -> str:
    return f"{n} of {listed}" if listed is not None else f"{n} of ?"


def format_table(results: Mapping[str, dict]) -> str:
    """The metrics table; a partial test set (``m["partial"]``, scored with --allow-partial) is marked in its row,
    its counts given against the split's listed ones."""
    head = "| dataset | R@1 | R@5 | R@10 | mAP | mINP | i2t R@1 | queries | gallery |"
    lines = [head, "|" + "---|" * 9]
    for name, m in results.items():
        p = m.get("partial")
        queries, gallery = ((_of(m["num_queries"], p["queries_listed"]), _of(m["num_gallery"], p["gallery_listed"]))
                            if p else (m["num_queries"], m["num_gallery"]))
        lines.append(f"| {name}{' (PARTIAL)' if p else ''} | {_fmt(m['R1'])} | {_fmt(m['R5'])} | {_fmt(m['R10'])} | "
                     f"{_fmt(m['mAP'])} | {_fmt(m['mINP'])} | {_fmt(m['i2t_R1'])} | {queries} | {gallery} |")
    return "\n".join(lines)


def partial_notes(results: Mapping[str, dict]) -> list[str]:
    """One line per partial test set: what was scored of what the split lists, and why."""
    out = []
    for name, m in results.items():
        p = m.get("partial")
        if p:
            out.append(f"PARTIAL {name}: {_of(p['shards'], p['shards_listed'])} shards, "
                       f"{_of(p['queries'], p['queries_listed'])} queries, {_of(p['gallery'], p['gallery_listed'])} "
                       f"gallery images ({'; '.join(p['problems'])}); not comparable with the whole split's numbers")
    return out


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_report(out_dir: str, tag: str, results: Mapping[str, dict], examples: Sequence[dict],
                 header: Mapping[str, str]) -> dict[str, str]:
    """Write ``TAG.json``, ``TAG.md``, ``TAG_cmc.png``, ``TAG_examples.png`` and the HTML report ``TAG.html``
    under ``out_dir``; returns the paths."""
    from evaluation.plots import plot_cmc, plot_examples
    from evaluation.report import write_html

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{tag}{suffix}") for k, suffix in
             (("json", ".json"), ("md", ".md"), ("cmc", "_cmc.png"), ("examples", "_examples.png"),
              ("html", ".html"))}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_json_safe(dict(results)), f, indent=2)
        f.write("\n")
    table = format_table(results)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(f"# Evaluation {tag}\n\n")
        for k, v in header.items():
            f.write(f"- {k}: {v}\n")
        f.write("\nText-to-image retrieval (every caption a query, every image once in the gallery; percentages). "
                "See docs/EVAL.md for the protocol.\n\n")
        f.write(table + "\n")
        without = {n: m["num_queries_without_match"] for n, m in results.items() if m["num_queries_without_match"]}
        if without:
            f.write("\nQueries without a match in the gallery (left out of the averages): "
                    + ", ".join(f"{n}: {c}" for n, c in without.items()) + "\n")
        for line in partial_notes(results):
            f.write(f"\n{line}\n")
    plot_cmc({n: m["cmc"] for n, m in results.items()}, paths["cmc"], title=f"CMC, {tag}")
    plot_examples([r for r in examples if r.get("kind", "sample") == "sample"], paths["examples"])
    write_html(paths["html"], tag, header, table, partial_notes(results), paths["cmc"], examples)
    return paths


# ------------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval.sh", description="Text-to-image person retrieval evaluation of a training run or a weights file.")
    p.add_argument("run_dir", nargs="?", help="training run directory (checkpoints/epoch_N.pt, params.json)")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="SPEC",
                   help="test shards, one dataset per SPEC: a directory (all *.tar), a brace pattern, a glob, a text "
                        "file listing shards, or NAME=SPEC to name it. Default: the test/ split next to each training "
                        "set of the run")
    p.add_argument("--epoch", type=int, help="evaluate checkpoints/epoch_N.pt (default: the highest N)")
    p.add_argument("--pretrained", metavar="FILE", help="evaluate this weights file or open_clip model folder "
                                                         "(local-dir) instead of a run (needs --data, --output, and "
                                                         "--model unless FILE is a checkpoint of this trainer or a "
                                                         "model folder)")
    p.add_argument("--model", help="open_clip model name (default: the checkpoint's, else params.json's)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the "
                                                                                  "checkpoint's, else params.json's, "
                                                                                  "else the model's person-crop "
                                                                                  "default)")
    p.add_argument("--output", metavar="DIR", help="output folder (default with a run: RUN_DIR/eval)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes (0: in the main process)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--chunk-size", type=int, default=None, help="query rows per metric chunk (default: automatic)")
    p.add_argument("--examples", type=int, default=4, help="retrieval examples drawn per dataset")
    p.add_argument("--worst", type=int, default=8, help="worst queries (lowest first match) per dataset shown in "
                                                        "the HTML report")
    p.add_argument("--allow-partial", action="store_true",
                   help="score a test split that lacks shards or samples its manifest.json / sizes.json lists "
                        "(refused by default); the report then says PARTIAL, with the counts")
    return p


def check_image_size(args) -> None:
    if args.image_size is not None and min(args.image_size) < 1:
        raise EvalError(f"--image-size must be two positive numbers H W, got {' '.join(map(str, args.image_size))}")


def pick_device(text: str) -> torch.device:
    """``--device``: auto (CUDA when available), cpu, cuda or cuda:N of a GPU that exists here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise EvalError(f"--device {text!r}: only auto, cpu, cuda and cuda:N are supported")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise EvalError(f"--device {text}: no CUDA GPU is usable here (torch {torch.__version__}, CUDA build "
                        f"{torch.version.cuda}); use --device cpu or auto")
    if device.index is not None and device.index >= n:
        raise EvalError(f"--device {text}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return device


def _check_args(args) -> torch.device:
    """Every flag that can be checked before any work; the device to use."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--examples", args.examples, 0), ("--worst", args.worst, 0),
                             ("--chunk-size", args.chunk_size, 1)):
        if value is not None and value < low:
            raise EvalError(f"{flag} must be >= {low}, got {value}")
    check_image_size(args)
    if args.pretrained and not args.run_dir:  # a run has both by default; a weights file does not
        for given, need in ((args.data, "--data SPEC (the test shards)"), (args.output, "--output DIR")):
            if not given:
                raise EvalError(f"--pretrained needs {need}")
    return pick_device(args.device)


def load_model(name: str, weights: str, image_size, device):
    from fast_clip.model import create_model, load_pretrained

    try:
        model = create_model(name, image_size=image_size, device="cpu")
    except (ValueError, RuntimeError) as e:
        raise EvalError(f"cannot build model {name!r}: {e}") from e
    try:
        load_pretrained(model, weights)
    except runs.CheckpointError:  # already one line naming the file
        raise
    except RuntimeError as e:  # load_state_dict's size mismatches
        first = str(e).strip().splitlines()
        detail = "; ".join(x.strip() for x in first[1:4]) or first[0]
        raise EvalError(f"weights file {weights!r} does not match model {name!r} at image size "
                        f"{tuple(image_size)}: {detail}") from e
    return model.to(device)


def _stored_model(w: runs.Weights, args) -> runs.Weights:
    """A run's checkpoint names the model it holds and the image size (hence the preprocessing) it was trained at:
    those win over params.json, which a later command (a refused ``--resume`` with other flags, a hand edit) may have
    rewritten; params.json is read only for what an older checkpoint lacks. A flag given still wins. Each
    disagreement is a warning. (The checkpoint is read here and once more by load_model: a second read of a file
    that is in the page cache, small next to scoring a test set.)"""
    stored = runs.trained_model(runs.load(w.path))
    if stored is None:
        return w
    name, size = stored
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise runs.CheckpointError(f"{w.path!r} stores image_size {size!r}, not [H, W]")
    ckpt, params = os.path.basename(w.path), os.path.join(w.run_dir, runs.PARAMS)
    for what, flag, given, in_params, in_ckpt in (("model", "--model", args.model, w.params.get("model"), name),
                                                  ("image_size", "--image-size", args.image_size,
                                                   w.params.get("image_size"), list(size))):
        if given is not None and _plain(given) != in_ckpt:
            print(f"warning: {flag} {_plain(given)} overrides the {what} {in_ckpt} stored in {ckpt}", file=sys.stderr)
        elif given is None and in_params is not None and _plain(in_params) != in_ckpt:
            print(f"warning: {params} says {what} {_plain(in_params)} but {ckpt} holds {in_ckpt}: using the "
                  f"checkpoint's (params.json rewritten after the checkpoint, e.g. by a refused --resume?)",
                  file=sys.stderr)
    return dataclasses.replace(w, model=args.model or name, image_size=tuple(args.image_size or size))


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def resolve_weights(args) -> runs.Weights:
    """The weights RUN_DIR / --pretrained name (common/runs.py's resolution), the model and image size settled: a
    flag given, else what the checkpoint stores, else params.json's (a run's older checkpoint), else the model's
    person-crop default."""
    from fast_clip.model import default_image_size

    w = runs.resolve(args.run_dir, args.pretrained, epoch=args.epoch, model=args.model, image_size=args.image_size)
    if w.run_dir is not None:
        w = _stored_model(w, args)
    if w.image_size is None:
        try:
            w = dataclasses.replace(w, image_size=default_image_size(w.model))
        except ValueError as e:
            raise EvalError(f"{e}" + (f" (from {os.path.join(w.run_dir, runs.PARAMS)})" if w.run_dir else "")) from e
    return w


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")


def _plan(args, w: runs.Weights) -> tuple[dict[str, str], str]:
    """(test sets, output folder)."""
    if w.run_dir is None:
        return _parse_data(args.data), args.output
    data = _parse_data(args.data) if args.data else default_datasets(w.params.get("train_data"))
    if not data:
        raise EvalError(f"no test data: {w.run_dir}/{runs.PARAMS} train_data={w.params.get('train_data')!r} has "
                        f"no test/ split next to it; pass --data")
    return data, args.output or os.path.join(w.run_dir, runs.EVAL_DIR)


def report_tag(args, w: runs.Weights, sets: Mapping[str, TestSet], out_dir: str, data_line: str) -> str:
    """The report's file name stem. A run scored on its own whole test split(s) keeps ``epoch_N``, unless the
    ``epoch_N.md`` already there records other data (``data_line`` differs: params.json's train_data was changed
    since); any other data is named by its dataset names and 8 hex digits of a hash of the shard files read
    (absolute paths, in order), plus ``partial`` when a set is: results of different data never share a file, so
    none overwrites another's."""
    plain = f"epoch_{w.epoch}"
    if w.run_dir is not None and not args.data and not any(ts.partial for ts in sets.values()):
        recorded = _recorded_data(os.path.join(out_dir, f"{plain}.md"))
        if recorded in (None, data_line):
            return plain
        print(f"warning: {out_dir}/{plain}.md holds the results of other data ({recorded}); not overwritten",
              file=sys.stderr)
    h = hashlib.sha256()
    for n, ts in sets.items():
        h.update(json.dumps([n, [p if shards.is_url(p) else os.path.abspath(p) for p in ts.shards]]).encode())
    stem = (f"epoch_{w.epoch}" if w.run_dir is not None
            else _safe(os.path.splitext(os.path.basename(w.path))[0]) or "pretrained")
    partial = "_partial" if any(ts.partial for ts in sets.values()) else ""
    return f"{stem}_{_safe('+'.join(sets))}{partial}_{h.hexdigest()[:8]}"


def _recorded_data(md_path: str) -> str | None:
    """The ``data:`` line of a report written by :func:`write_report`; None when there is none."""
    try:
        with open(md_path, encoding="utf-8") as f:
            return next((ln[len("- data: "):].rstrip("\n") for ln in f if ln.startswith("- data: ")), None)
    except (OSError, UnicodeDecodeError):
        return None


def _read_test_sets(data: Mapping[str, str], allow_partial: bool) -> dict[str, TestSet]:
    sets = {}
    for n, spec in data.items():
        print(f"reading test set {n} ({spec}) ...", file=sys.stderr, flush=True)
        ts = sets[n] = load_test_set(spec, name=n, allow_partial=allow_partial)
        print(f"  {ts.num_queries} queries, {ts.num_gallery} gallery images", file=sys.stderr, flush=True)
        for line in partial_notes({n: {"partial": ts.partial}}):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return sets


def _run(args) -> int:
    from fast_clip.model import get_tokenizer

    device = _check_args(args)
    w = resolve_weights(args)
    data, out_dir = _plan(args, w)
    header = ({"run": w.run_dir, "checkpoint": w.path, "epoch": str(w.epoch)} if w.run_dir else {"weights": w.path})
    header.update(model=w.model, image_size=f"{w.image_size[0]}x{w.image_size[1]}", device=str(device),
                  date=_dt.datetime.now().isoformat(timespec="seconds"),
                  data="; ".join(f"{n}={spec}" for n, spec in data.items()))
    sets = _read_test_sets(data, args.allow_partial)  # before the model, so that bad data fails fast
    tag = report_tag(args, w, sets, out_dir, header["data"])
    model = load_model(w.model, w.path, w.image_size, device)
    tokenizer, transform = get_tokenizer(w.model), default_transform(w.image_size)
    results, examples = {}, []
    for n, ts in sets.items():
        print(f"scoring {n} on {device} ...", file=sys.stderr, flush=True)
        results[n], ex = evaluate_testset(model, tokenizer, transform, ts, device, batch_size=args.batch_size,
                                          num_workers=args.workers, chunk_size=args.chunk_size,
                                          num_examples=args.examples, num_worst=args.worst)
        if ts.partial:
            results[n]["partial"] = ts.partial
        examples += ex
    paths = write_report(out_dir, tag, results, examples, header)
    print(f"{w.model} {os.path.basename(w.path)} ({header.get('epoch', 'pretrained')}):")
    print("\n".join([format_table(results)] + partial_notes(results)))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['cmc']}, {paths['examples']}")
    print(f"HTML report: {paths['html']}")
    return 0


main = cli(_run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
