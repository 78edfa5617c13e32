"""Export a training run's image and text encoders to ONNX and check them against PyTorch with onnxruntime.

Command line (``scripts/export_onnx.sh``)::

    python -m evaluation.export_onnx RUN_DIR [--epoch N] [--output DIR] [--opset 17] [--batch-check 3]
                                     [--atol 1e-4] [--exporter torchscript|dynamo]
    python -m evaluation.export_onnx --pretrained FILE [--model NAME] [--image-size H W] --output DIR

Writes ``image_encoder.onnx`` (``image`` float32 [batch, 3, H, W], already resized and CLIP-normalised ->
``image_embedding`` float32 [batch, D], L2-normalised), ``text_encoder.onnx`` (``text`` int64 token ids
[batch, context_length] from the model's tokenizer -> ``text_embedding`` float32 [batch, D], L2-normalised) and
``export.json``. The batch axis is dynamic. Both files are then run with onnxruntime (CPUExecutionProvider) at batch 1
and ``--batch-check`` on random images and real tokenised captions and compared with PyTorch; a max abs diff above
``--atol`` exits with status 1, bad input (no checkpoint, unreadable weights, unknown model) with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Sequence

import numpy as np
import torch

from common import runs
from evaluation.evaluate import check_image_size, load_model, resolve_weights
from evaluation.evaluate import cli
from fast_clip.retrieval.testset import EvalError

__all__ = ["Encoder", "ImageEncoder", "TextEncoder", "export_encoders", "verify_encoders", "main"]

IMAGE_FILE, TEXT_FILE, REPORT_FILE = "image_encoder.onnx", "text_encoder.onnx", "export.json"
DEFAULT_OPSET = 17  # torchscript exporter; the dynamo exporter starts at 18
DYNAMO_MIN_OPSET = 18
MIN_OPSET, TORCHSCRIPT_MAX_OPSET = 7, 20  # torch.onnx's range for dynamo=False (torch 2.14)
# Captions for the check: real tokenised text of varied lengths, so the end-of-text position the text tower pools at
# moves.
CHECK_CAPTIONS = (
    "A man wearing a black jacket, blue jeans and white sneakers, carrying a backpack.",
    "The woman has long brown hair and wears a red dress with black shoes.",
    "a young person in a grey hoodie",
    "He is wearing a white short-sleeved shirt, dark shorts and sandals; he holds a phone in his right hand.",
    "woman, yellow top",
    "The pedestrian wears a green coat over a striped sweater, black trousers and brown boots, and carries a bag.",
)


class Encoder(torch.nn.Module):
    """One tower of the model as its own graph: [B, 3, H, W] normalised pixels (``image``) or [B, context_length] int64
    token ids (``text``) -> [B, D] unit-norm embeddings."""

    def __init__(self, model, modality: str):
        super().__init__()
        self.model = model
        self.encode = model.encode_image if modality == "image" else model.encode_text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x, normalize=True)


def ImageEncoder(model) -> Encoder:  # noqa: N802 - kept as the public names of the two towers
    return Encoder(model, "image")


def TextEncoder(model) -> Encoder:  # noqa: N802
    return Encoder(model, "text")


def _context_length(model, tokenizer) -> int:
    n = getattr(model, "context_length", None) or getattr(tokenizer, "context_length", None)
    if not n:
        raise EvalError("cannot tell the model's text context length")
    return int(n)


def _export_one(module: torch.nn.Module, example: torch.Tensor, path: str, in_name: str, out_name: str,
                opset: int, exporter: str) -> None:
    try:
        _export_call(module, example, path, in_name, out_name, opset, exporter)
    except Exception as e:  # the exporters raise many types; report which encoder and why, keep the chain
        what = "image" if in_name == "image" else "text"
        raise EvalError(f"torch.onnx.export ({exporter}) of the {what} encoder to {path!r} failed: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def _export_call(module, example, path, in_name, out_name, opset, exporter) -> None:
    if exporter == "torchscript":
        # The TorchScript (tracing) exporter, dynamo=False. Deprecated since torch 2.9 (when dynamo became the
        # default) but still shipped, with the same dynamo=False / dynamic_axes API, through 2.14 (the pinned
        # version, where this is tested); it exports the open_clip towers in about a second, needs no onnxscript,
        # and gives a symbolic batch axis. The dynamo exporter (--exporter dynamo) also works here but is ~15x
        # slower (17 s vs 1 s for PersonTiny) and its dynamic_shapes / opset defaults moved between releases.
        # The tracer warns at nn.MultiheadAttention's Python shape asserts (embed_dim / head count, fixed for a
        # model), about the deprecation, and that aten::index (the text tower's pick of the end-of-text token,
        # x[arange(B), text.argmax(-1)]) would be wrong with negative indices, which these never are; those are
        # silenced. The onnxruntime check at two batch sizes is what proves the graph right.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Exporting aten::index operator of advanced indexing.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=r"The feature will be removed.*")
            torch.onnx.export(module, (example,), path, input_names=[in_name], output_names=[out_name],
                              dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    else:
        from torch.export import Dim

        prog = torch.onnx.export(module, (example,), input_names=[in_name], output_names=[out_name],
                                 dynamic_shapes={in_name: {0: Dim("batch")}},  # forward()'s argument name
                                 opset_version=opset, dynamo=True, verbose=False)
        prog.save(path)


def export_encoders(model, image_size: tuple[int, int], context_length: int, out_dir: str,
                    opset: int = DEFAULT_OPSET, exporter: str = "torchscript") -> dict[str, str]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` under ``out_dir`` (fp32, on CPU); returns their paths."""
    import onnx

    os.makedirs(out_dir, exist_ok=True)
    model = model.to("cpu").float().eval()
    paths = {"image": os.path.join(out_dir, IMAGE_FILE), "text": os.path.join(out_dir, TEXT_FILE)}
    h, w = image_size
    # nn.MultiheadAttention's inference fast path (taken in eval mode under no_grad, or when no parameter needs a
    # gradient) is the fused aten::_native_multi_head_attention, which has no ONNX symbolic: switch it off while
    # tracing so the exporter sees the plain matmul/softmax graph.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # Batch 2 at trace time: a batch of 1 could let the tracer fold the batch size into a constant somewhere.
        _export_one(ImageEncoder(model).eval(), torch.randn(2, 3, h, w), paths["image"], "image",
                    "image_embedding", opset, exporter)
        _export_one(TextEncoder(model).eval(), torch.zeros(2, context_length, dtype=torch.long), paths["text"],
                    "text", "text_embedding", opset, exporter)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for p in paths.values():
        try:
            onnx.checker.check_model(p)
        except Exception as e:  # onnx raises its own ValidationError, not exported at top level in every version
            raise EvalError(f"the exported {p!r} fails onnx.checker: {str(e).splitlines()[0]}") from e
    return paths


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())  # onnxruntime ignores OMP_NUM_THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def verify_encoders(model, tokenizer, paths: dict[str, str], image_size: tuple[int, int],
                    batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> dict[str, dict]:
    """Run both ONNX files with onnxruntime and PyTorch on the same inputs:
    ``{"image"|"text": {"max_abs_diff", "max_norm_error", "batch_sizes", "dim"}}`` (maxima over the batch sizes)."""
    model = model.to("cpu").float().eval()
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    sessions = {k: _session(p) for k, p in paths.items()}
    torch_fn = {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}
    out = {k: {"max_abs_diff": 0.0, "max_norm_error": 0.0, "batch_sizes": list(batch_sizes), "dim": None}
           for k in paths}
    for b in batch_sizes:
        captions = [CHECK_CAPTIONS[i % len(CHECK_CAPTIONS)] for i in range(b)]
        inputs = {"image": torch.randn(b, 3, h, w, generator=gen), "text": tokenizer(captions).long()}
        for k, x in inputs.items():
            with torch.no_grad():
                ref = torch_fn[k](x).numpy()
            got = sessions[k].run(None, {sessions[k].get_inputs()[0].name: x.numpy()})[0]
            if got.shape != ref.shape:
                raise EvalError(f"{paths[k]!r} at batch {b}: onnxruntime output shape {got.shape} != PyTorch's "
                                f"{ref.shape}")
            r = out[k]
            r["dim"] = int(got.shape[1])
            r["max_abs_diff"] = max(r["max_abs_diff"], float(np.abs(got.astype(np.float64) - ref).max()))
            r["max_norm_error"] = max(r["max_norm_error"],
                                      float(np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - 1).max()))
    return out


# ------------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_onnx.sh",
        description="Export a run's image and text encoders to ONNX (dynamic batch) and check them with onnxruntime.")
    p.add_argument("run_dir", nargs="?", help="training run directory (checkpoints/epoch_N.pt, params.json)")
    p.add_argument("--epoch", type=int, help="export checkpoints/epoch_N.pt (default: the highest N)")
    p.add_argument("--pretrained", metavar="FILE", help="export this weights file instead of a run (needs --output, "
                                                         "and --model unless FILE is a checkpoint of this trainer)")
    p.add_argument("--model", help="open_clip model name (default: params.json's, or the checkpoint's)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the run's or the checkpoint's, else the model's person-crop default)")
    # --output like make_shards and eval.sh; --out is the name it had first
    p.add_argument("--output", "--out", metavar="DIR", help="output folder (default with a run: RUN_DIR/onnx)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}, {DYNAMO_MIN_OPSET} with "
                                             f"--exporter dynamo)")
    p.add_argument("--batch-check", type=int, default=3, metavar="B",
                   help="check onnxruntime against PyTorch at batch 1 and B (default 3)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted max abs diff (default 1e-4)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript, i.e. dynamo=False; dynamo is slower and needs "
                        "onnxscript)")
    return p


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _check_args(args) -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise EvalError(f"{e.name} is not installed: pip install -r requirements-eval.txt") from e
    if args.pretrained and not args.run_dir and not args.output:
        raise EvalError("--pretrained needs --output DIR")
    if args.batch_check < 1:
        raise EvalError(f"--batch-check must be >= 1, got {args.batch_check}")
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise EvalError(f"--atol must be a finite number >= 0, got {args.atol}")
    check_image_size(args)
    if args.opset is None:
        args.opset = DYNAMO_MIN_OPSET if args.exporter == "dynamo" else DEFAULT_OPSET
    if args.exporter == "dynamo" and args.opset < DYNAMO_MIN_OPSET:
        raise EvalError(f"--exporter dynamo needs --opset >= {DYNAMO_MIN_OPSET}, got {args.opset}")
    if args.exporter == "torchscript" and not MIN_OPSET <= args.opset <= TORCHSCRIPT_MAX_OPSET:
        raise EvalError(f"--opset must be {MIN_OPSET} to {TORCHSCRIPT_MAX_OPSET} with the torchscript exporter, "
                        f"got {args.opset}")


def _report(args, w: runs.Weights, ctx: int, paths: dict[str, str], check: dict, batches: list[int]) -> dict:
    """export.json: what was exported from where, the two graphs' inputs and outputs, and the onnxruntime check."""
    size = w.image_size

    def encoder(k, shape, dtype):
        return {"path": os.path.abspath(paths[k]), "input": k, "input_shape": shape, "input_dtype": dtype,
                "output": f"{k}_embedding", "dim": check[k]["dim"]}

    return {
        "model": w.model, "checkpoint": os.path.abspath(w.path), "epoch": w.epoch, "image_size": list(size),
        "context_length": ctx, "embed_dim": check["image"]["dim"], "opset": args.opset, "exporter": args.exporter,
        "image_encoder": encoder("image", ["batch", 3, size[0], size[1]], "float32"),
        "text_encoder": encoder("text", ["batch", ctx], "int64"),
        "check": {"provider": "CPUExecutionProvider", "batch_sizes": batches, "atol": args.atol,
                  "passed": all(c["max_abs_diff"] <= args.atol for c in check.values()),
                  "max_abs_diff": {k: c["max_abs_diff"] for k, c in check.items()},
                  "max_norm_error": {k: c["max_norm_error"] for k, c in check.items()}},
        "versions": _versions(),
    }


def _run(args) -> int:
    from fast_clip.model import get_tokenizer

    _check_args(args)
    w = resolve_weights(args)
    out_dir = args.output or os.path.join(w.run_dir, runs.ONNX_DIR)
    model = load_model(w.model, w.path, w.image_size, "cpu").eval()
    tokenizer = get_tokenizer(w.model)
    ctx = _context_length(model, tokenizer)
    print(f"exporting {w.model} from {w.path} (image {w.image_size[0]}x{w.image_size[1]}, context length {ctx}, "
          f"opset {args.opset}, {args.exporter} exporter) to {out_dir}")
    paths = export_encoders(model, w.image_size, ctx, out_dir, opset=args.opset, exporter=args.exporter)
    batches = sorted({1, args.batch_check})
    check = verify_encoders(model, tokenizer, paths, w.image_size, batch_sizes=batches)
    report = _report(args, w, ctx, paths, check, batches)
    report_path = os.path.join(out_dir, REPORT_FILE)
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for k in ("image", "text"):
        print(f"{k} encoder: {paths[k]}  onnxruntime vs PyTorch max abs diff {check[k]['max_abs_diff']:.3e} "
              f"(batch {', '.join(map(str, batches))}; unit-norm error {check[k]['max_norm_error']:.1e})")
    print(f"wrote {report_path}")
    if not report["check"]["passed"]:
        bad = ", ".join(f"{k} {c['max_abs_diff']:.3e}" for k, c in check.items() if c["max_abs_diff"] > args.atol)
        print(f"error: onnxruntime embeddings differ from PyTorch's by more than --atol {args.atol:g}: {bad}",
              file=sys.stderr)
        return 1
    return 0


main = cli(_run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
