"""Why an identity head helps or hurts: what its classifier learnt, measured on the training split.

For each run folder (trained with --id-loss arcface or linear), from its final checkpoint:
  * train id accuracy of the head on the training images and captions (argmax == person);
  * how far the prototypes are from the persons' features: mean cos(w_y, mean image feature of y) and the same for
    the text features (a head that learnt its classes points each row at its person's features);
  * the gradient the id loss sends into the features at initialisation, relative to the contrastive loss's, on one
    batch of 64 training pairs (random-init model; the same seed as the runs).

    python bench/id_head_probe.py --shards shards/demo_synth RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from common import runs  # noqa: E402
from evaluation.evaluate import load_model  # noqa: E402
from fast_clip.retrieval.testset import extract_features, load_test_set  # noqa: E402
from fast_clip.id_head import ArcFaceHead, LinearIdHead, arcface_loss  # noqa: E402
from fast_clip.losses import LossConfig, build_loss  # noqa: E402
from fast_clip.model import create_model, get_tokenizer  # noqa: E402
from common.transforms import build_transform  # noqa: E402


def _head(params: dict, state: dict, num_ids: int, dim: int):
    if params.get("id_loss") == "linear":
        head = LinearIdHead(num_ids, dim)
    else:
        head = ArcFaceHead(num_ids, dim, subcenters=params.get("arcface_subcenters", 1))
    head.load_state_dict(state)
    return head.eval()


def _prototypes(head) -> torch.Tensor:
    w = head.fc.weight if isinstance(head, LinearIdHead) else head.weight.view(head.num_ids, head.subcenters, -1)[:, 0]
    return F.normalize(w.detach(), dim=-1)


def probe_run(run: Path, ts, device="cpu") -> dict:
    # the evaluator's run reading: its final epoch_N.pt, its model name and image size
    w = runs.resolve(str(run), None)
    params, ckpt, name, image_size = w.params, w.path, w.model, w.image_size
    model = load_model(name, ckpt, image_size, device).eval()
    ck = runs.load(ckpt)  # the identity head sits beside the state_dict
    img, txt = extract_features(model, get_tokenizer(name), build_transform(tuple(image_size), train=False), ts, device)
    num_ids = int(max(ts.gallery_pids.max(), ts.query_pids.max())) + 1
    gp, qp = torch.as_tensor(ts.gallery_pids), torch.as_tensor(ts.query_pids)
    mean_img = F.normalize(torch.zeros(num_ids, img.shape[1]).index_add_(0, gp, img), dim=-1)
    own = float((img * mean_img[gp]).sum(1).mean())  # how tight the persons' images are, with or without a head
    if not ck.get("id_head"):
        return {"run": run.name, "id_loss": "none", "cos_image_to_person_mean": own}
    head = _head(params, ck["id_head"], num_ids, img.shape[1])
    with torch.no_grad():
        acc_img = float((head(img).argmax(1) == gp).float().mean())
        acc_txt = float((head(txt).argmax(1) == qp).float().mean())
        proto = _prototypes(head)
        mean_txt = F.normalize(torch.zeros(num_ids, txt.shape[1]).index_add_(0, qp, txt), dim=-1)
        cos_img = float((proto * mean_img).sum(1).mean())
        cos_txt = float((proto * mean_txt).sum(1).mean())
    return {"run": run.name, "id_loss": params.get("id_loss"), "train_id_acc_img": acc_img,
            "train_id_acc_txt": acc_txt, "cos_proto_to_person_img": cos_img, "cos_proto_to_person_txt": cos_txt,
            "cos_image_to_person_mean": own}


def grad_ratio_at_init(ts, settings: list[dict], seed: int = 0, batch: int = 64) -> list[dict]:
    """||d L_id / d features|| / ||d L_contrastive / d features|| on one training batch of a random-init model."""
    torch.manual_seed(seed)
    model = create_model("PersonTiny").eval()
    tok = get_tokenizer("PersonTiny")
    tf = build_transform((64, 32), train=False)  # PersonTiny's input size (the runs' params.json)
    idx = torch.randperm(ts.num_queries)[:batch]
    texts = tok([ts.captions[i] for i in idx])
    images = torch.stack([tf(ts.image(int(ts.query_gallery_index[i]))) for i in idx])
    pids = torch.as_tensor(ts.query_pids)[idx]
    num_ids = int(ts.query_pids.max()) + 1
    with torch.no_grad():
        f_img, f_txt, _ = model(images, texts)[:3]
    out = []
    contrastive = build_loss(LossConfig.from_name("fastclip-v3", gamma=1.0, gamma_schedule="constant"), num_ids * 8)
    fi, ft = f_img.clone().requires_grad_(True), f_txt.clone().requires_grad_(True)
    loss, _ = contrastive(fi, ft, torch.tensor(1 / 0.07), keys=torch.arange(batch))
    loss.backward()
    base = float(torch.cat([fi.grad, ft.grad]).norm())
    for s in settings:
        torch.manual_seed(seed)
        fi, ft = f_img.clone().requires_grad_(True), f_txt.clone().requires_grad_(True)
        if s["kind"] == "linear":
            head = LinearIdHead(num_ids, fi.shape[1])
            term = 0.5 * (F.cross_entropy(head(fi), pids) + F.cross_entropy(head(ft), pids))
        else:
            head = ArcFaceHead(num_ids, fi.shape[1])
            term = 0.5 * (arcface_loss(head(fi), pids, s["scale"], s["margin"])
                          + arcface_loss(head(ft), pids, s["scale"], s["margin"]))
        (s.get("weight", 1.0) * term).backward()
        g = float(torch.cat([fi.grad, ft.grad]).norm())
        out.append({**s, "id_loss_at_init": float(term.detach()), "feature_grad_ratio": g / base})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/demo_synth")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    ap.add_argument("runs", nargs="*")
    a = ap.parse_args(argv)
    ts = load_test_set(f"{a.shards}/train", name="train")
    rows = [probe_run(Path(r), ts) for r in a.runs]
    init = grad_ratio_at_init(ts, [{"kind": "arcface", "scale": 30.0, "margin": 0.2},
                                   {"kind": "arcface", "scale": 30.0, "margin": 0.2, "weight": 0.05},
                                   {"kind": "arcface", "scale": 16.0, "margin": 0.1},
                                   {"kind": "linear"}])
    print("| run | head | train id acc (img / txt) | cos(prototype, person mean) img / txt | cos(image, person mean) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["id_loss"] == "none":
            print(f"| {r['run']} | none | – | – | {r['cos_image_to_person_mean']:.3f} |")
            continue
        print(f"| {r['run']} | {r['id_loss']} | {100 * r['train_id_acc_img']:.1f} / {100 * r['train_id_acc_txt']:.1f} "
              f"| {r['cos_proto_to_person_img']:.3f} / {r['cos_proto_to_person_txt']:.3f} "
              f"| {r['cos_image_to_person_mean']:.3f} |")
    print("\n| head at init | id loss | ‖∂L_id/∂f‖ / ‖∂L_contrastive/∂f‖ |")
    print("|---|---|---|")
    for r in init:
        name = r["kind"] + (f" s={r['scale']:g} m={r['margin']:g}" if r["kind"] == "arcface" else "")
        name += f" w={r['weight']:g}" if "weight" in r else ""
        print(f"| {name} | {r['id_loss_at_init']:.2f} | {r['feature_grad_ratio']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": rows, "init": init}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
