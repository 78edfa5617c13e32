"""OpenAI-format TorchScript CLIP files as --pretrained: their tensors are read without running the archive, equal
torch.jit.load's state_dict, load exactly as the same weights given as a state dict, and archives whose pickle names
anything else are refused before anything runs."""
import io
import warnings
import zipfile

import pytest
import torch

from common.runs import CheckpointError
from fast_clip.model import create_model
from fast_clip.torchscript import is_torchscript, read_state_dict


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
