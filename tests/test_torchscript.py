"""OpenAI-format TorchScript CLIP files as --pretrained: their tensors are read without running the archive, equal
torch.jit.load's state_dict, load exactly as the same weights given as a state dict, and archives whose pickle names
anything else are refused before anything runs."""
import io
import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from common.runs import CheckpointError
from fast_clip.model import create_model
from fast_clip.torchscript import is_torchscript, read_state_dict

ROOT_SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A traced tiny CLIP with OpenAI's parameter names and its input_resolution / context_length / vocab_size
    buffers, saved as TorchScript (as OpenAI's ViT-B-16.pt is)."""
    torch.manual_seed(0)
    model = create_model("PersonTiny").eval()
    for k, v in (("input_resolution", 64), ("context_length", 40), ("vocab_size", 49408)):
        if hasattr(model, k):  # open_clip keeps two of them as plain ints; OpenAI's archives hold them as tensors
            delattr(model, k)
        model.register_buffer(k, torch.tensor(v))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(1, 3, 64, 32), torch.randint(0, 99, (1, 40))),
                                 check_trace=False)
        path = tmp_path_factory.mktemp("ts") / "tiny-openai.pt"
        torch.jit.save(traced, str(path))
    return path, model


def test_tensors_equal_torch_jit_load(archive):
    path, _ = archive
    assert is_torchscript(str(path))
    sd = read_state_dict(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.jit.load(str(path)).state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_pretrained_torchscript_loads_like_the_same_state_dict(archive, tmp_path):
    path, model = archive
    from_ts = create_model("PersonTiny", pretrained=str(path))
    plain = {k: v for k, v in model.state_dict().items() if k not in ("input_resolution", "context_length",
                                                                      "vocab_size")}
    torch.save(plain, tmp_path / "sd.pt")
    from_sd = create_model("PersonTiny", pretrained=str(tmp_path / "sd.pt"))
    for k, v in from_sd.state_dict().items():
        torch.testing.assert_close(from_ts.state_dict()[k], v, atol=0, rtol=0, msg=k)
        torch.testing.assert_close(v, model.state_dict()[k], atol=0, rtol=0, msg=k)


def test_an_archive_naming_anything_else_is_refused_and_nothing_runs(archive, tmp_path):
    path, _ = archive
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, payload if n.endswith("/data.pkl") else src.read(n))
    with pytest.raises(CheckpointError, match="os.system.*refused"):
        create_model("PersonTiny", pretrained=str(evil))
    assert not marker.exists()


def _rss_growth_of(code: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter that has already imported the model stack and built a model (torch's CUDA
    build alone holds ~500 MB); (how many MB its peak RSS grew while ``code`` ran, its stdout)."""
    import subprocess
    import sys
    probe = ("import resource\nfrom common.runs import CheckpointError\nfrom fast_clip.model import create_model\ncreate_model('PersonTiny')\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n" + code +
             "\nprint('grew', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT_SRC)})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split("grew ")[-1]), r.stdout


@pytest.mark.slow  # a fresh interpreter, and 1 GiB to deflate
def test_an_archive_whose_storage_inflates_is_refused_before_it_takes_the_memory(archive, tmp_path):
    """A 1 MB archive whose first storage inflates to 1 GiB (what a hostile download can be): refused from the zip
    header's sizes, under 200 MB of RSS (it took 2.8 GB before)."""
    path, _ = archive
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bomb, "w") as dst:
        first = sorted(n for n in src.namelist() if "/data/" in n and n.rsplit("/", 1)[1].isdigit())[0]
        for n in src.namelist():
            if n == first:
                info = zipfile.ZipInfo(n, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(info, "w", force_zip64=True) as f:
                    zeros = bytes(2**24)
                    for _ in range(64):
                        f.write(zeros)
            else:
                dst.writestr(n, src.read(n))
    assert bomb.stat().st_size < 40 * 2**20  # ~30 MB, as the archive of the report
    grew, out = _rss_growth_of(f"try:\n    create_model('PersonTiny', pretrained={str(bomb)!r})\n"
                               f"except CheckpointError as e:\n    print('refused:', e)\n")
    assert "refused:" in out and "declares" in out, out
    assert grew < 200, f"peak RSS grew by {grew} MB"


def test_an_inflating_storage_is_refused_by_its_compression_ratio(tmp_path):
    """A storage whose declared size matches its pickle but comes from a tiny deflated entry is refused unread."""
    from fast_clip.torchscript import TorchScriptError, _read_storage
    z_path = tmp_path / "z.zip"
    with zipfile.ZipFile(z_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/data/0", bytes(64 * 2**20))
    with zipfile.ZipFile(z_path) as z, pytest.raises(TorchScriptError, match="inflates"):
        _read_storage(z, "a/data/0", torch.float32, 16 * 2**20, str(z_path))


def test_malformed_archives_are_one_error_line(archive, tmp_path):
    path, _ = archive
    for name, data in (("garbage", b"\x80\x02this is not a pickle"), ("empty", b"")):
        bad = tmp_path / f"{name}.pt"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
            for n in src.namelist():
                dst.writestr(n, data if n.endswith("/data.pkl") else src.read(n))
        with pytest.raises(CheckpointError, match="not a readable TorchScript archive") as e:
            create_model("PersonTiny", pretrained=str(bad))
        assert "\n" not in str(e.value)


@pytest.mark.slow  # scripting an open_clip model takes ~15 s
def test_scripted_and_top_level_traced_archives_load_their_tensors(tmp_path):
    """torch.jit.script archives (their pickle names TorchScript's inert list builders) and a model class traced from
    a user's own script (its class is `__torch__.Name`, in code/__torch__.py) are read, equal to torch.jit.load."""
    import subprocess
    import sys
    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys, warnings, torch\nwarnings.simplefilter('ignore')\nsys.path.insert(0, sys.argv[2])\n"
        "from fast_clip.model import create_model\n"
        "class Name(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(4, 3)\n"
        "        self.register_buffer('scale', torch.ones(2))\n"
        "    def forward(self, x):\n        return self.lin(x) * self.scale[0]\n"
        "torch.manual_seed(0)\n"
        "torch.jit.save(torch.jit.trace(Name(), torch.randn(1, 4)), sys.argv[1] + '/traced.pt')\n"
        "torch.jit.save(torch.jit.script(create_model('PersonTiny').eval()), sys.argv[1] + '/scripted.pt')\n")
    subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT_SRC)], check=True, timeout=300)
    with zipfile.ZipFile(tmp_path / "traced.pt") as z:
        assert any(n.endswith("code/__torch__.py") for n in z.namelist())  # the class sits at the top level
    for name in ("traced.pt", "scripted.pt"):
        p = str(tmp_path / name)
        assert is_torchscript(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = torch.jit.load(p).state_dict()
        sd = read_state_dict(p)
        assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref), name
    model = create_model("PersonTiny", pretrained=str(tmp_path / "scripted.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.jit.load(str(tmp_path / "scripted.pt")).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
