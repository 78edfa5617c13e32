"""The evaluation's HTML report (evaluation/report.py): one self-contained file beside the JSON with the metrics, the
CMC curve, sampled and worst queries with their top gallery images; it parses, every image decodes, and (when
Debian's chromium is installed) a headless browser renders it with every image loaded."""
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from shard_fixtures import write_shards

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from evaluation.evaluate import main
    from fast_clip.model import create_model

    tmp = tmp_path_factory.mktemp("report")
    write_shards(str(tmp / "shards"), split="test", num_ids=8, images_per_id=2)
    torch.manual_seed(0)
    model = create_model("PersonTiny")
    torch.save({"state_dict": model.state_dict(), "model_name": "PersonTiny", "image_size": [64, 32], "epoch": 1,
                "step": 1}, tmp / "c.pt")
    assert main(["--pretrained", str(tmp / "c.pt"), "--data", f"synth={tmp / 'shards' / 'test'}", "--output",
                 str(tmp / "eval"), "--workers", "0", "--device", "cpu", "--examples", "3", "--worst", "4"]) == 0
    (html,) = (tmp / "eval").glob("*.html")
    (js,) = (tmp / "eval").glob("*.json")
    assert html.stem == js.stem  # beside its JSON, same name
    return html


def test_report_parses_and_every_image_decodes(report):
    from PIL import Image

    text = report.read_text(encoding="utf-8")
    p = _Images()
    p.feed(text)
    p.close()
    assert len(p.srcs) == 1 + (3 + 4) * 10  # the CMC curve, then 10 gallery images for each of 7 queries
    for src in p.srcs:
        m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]  # embedded: nothing to fetch, usable offline
        Image.open(io.BytesIO(base64.b64decode(m.group(2)))).load()
    assert "table" in p.tags and "<th>R@1</th>" in text and "| synth" not in text
    assert text.count('class="query"') == 7 and "Worst queries" in text and "Sample queries" in text
    ranks = [int(r) for r in re.findall(r"first match at rank (\d+)", text)]
    worst = ranks[3:]
    assert worst == sorted(worst, reverse=True) and worst[0] >= max(ranks[:3])
    assert not re.search(r"""(src|href)=["'](https?:|//|file:)""", text)


def test_first_match_ranks_agree_with_the_metrics():
    """The worst queries are ordered by the metrics' own ranks (ties by gallery index included)."""
    from fast_clip.retrieval.metrics import match_ranks
    from fast_clip.retrieval.protocol import first_match_ranks
    from fast_clip.retrieval.testset import TestSet

    g = torch.Generator().manual_seed(0)
    img = torch.randn(30, 8, generator=g).round()  # rounded: many exact ties
    txt = torch.randn(50, 8, generator=g).round()
    ts = TestSet("t", [], captions=["c"] * 50, query_pids=np.arange(50) % 12,
                 gallery_pids=np.arange(30) % 10, gallery_images=[b""] * 30)
    got = first_match_ranks(img, txt, ts, chunk_size=7)
    sim = txt @ img.t()
    want = [(match_ranks(sim[q], int(ts.query_pids[q]), ts.gallery_pids) or [0])[0] for q in range(50)]
    assert got.tolist() == want and 0 in want


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium'; CI may lack it): "
                                             "the report's headless render is not checked here")
@pytest.mark.slow  # a whole training run or a process of its own
def test_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    r = subprocess.run(common + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', r.stdout)
    assert m, r.stdout[:500]
    assert int(m.group(1)) == int(m.group(2)) == 71
    shot = tmp_path / "report.png"
    r = subprocess.run(common + ["--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
    from PIL import Image
    a = np.asarray(Image.open(shot).convert("RGB"))
    assert a.std() > 10  # something was drawn, not a blank page
