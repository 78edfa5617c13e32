"""Shards streamed from where they live: http:// (a python -m http.server on 127.0.0.1, directory listing included),
file:// and pipe: specs train exactly as local disk does, and the evaluator reads the same specs."""
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from shard_fixtures import write_shards


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    write_shards(str(root / "tiny"), split="train", num_ids=8, shard_size=8)     # 32 pairs, 4 shards
    write_shards(str(root / "tiny"), split="test", num_ids=4, shard_size=8, seed=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield {"root": root, "url": f"http://127.0.0.1:{port}"}
    proc.terminate()
    proc.wait()


def _train(tmp_path, name, spec, loss="fastclip-v3"):
    from training.main import main
    assert main(["--train-data", spec, "--model", "PersonTiny", "--batch-size", "8", "--workers", "0",
                 "--epochs", "1", "--logs-dir", str(tmp_path), "--name", name, "--warmup", "1", "--loss", loss,
                 "--seed", "2"]) == 0
    return torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", weights_only=True)


@pytest.mark.slow  # a whole training run
def test_http_file_and_pipe_specs_train_exactly_like_local_disk(served, tmp_path):
    local = served["root"] / "tiny" / "train"
    ref = _train(tmp_path, "local", str(local))
    specs = {
        "http_dir": f"{served['url']}/tiny/train",
        "http_brace": f"{served['url']}/tiny/train/train-{{000000..000003}}.tar",
        "file": f"file://{local}",
        "pipe": f"pipe:cat {local}/train-{{000000..000003}}.tar",  # no index: counted once, then the same plan
    }
    for name, spec in specs.items():
        got = _train(tmp_path, name, spec)
        for k, v in ref["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][k], v, atol=0, rtol=0, msg=f"{name}: {k}")
        for k, v in ref["loss"].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(got["loss"][k], v, atol=0, rtol=0, msg=f"{name}: loss {k}")


def test_evaluator_reads_http_file_and_pipe_specs(served):
    from evaluation.evaluate import default_datasets
    from fast_clip.retrieval.testset import load_test_set

    local = served["root"] / "tiny" / "test"
    ref = load_test_set(str(local))
    for spec in (f"{served['url']}/tiny/test", f"file://{local}", f"pipe:cat {local}/test-{{000000..000001}}.tar"):
        ts = load_test_set(spec)
        assert ts.captions == ref.captions and ts.gallery_images == ref.gallery_images, spec
        np.testing.assert_array_equal(ts.query_pids, ref.query_pids)
    # eval.sh RUN finds the test split next to a URL training set without mangling the URL
    assert default_datasets(f"file://{served['root']}/tiny/train") == {"tiny": f"file://{served['root']}/tiny/test"}
    assert default_datasets(f"{served['url']}/tiny/train") == {"tiny": f"{served['url']}/tiny/test"}


def test_failing_pipe_and_unknown_protocol_are_clear_errors(tmp_path):
    from training import data as D

    with pytest.raises(D.DataError, match="cannot be counted"):
        D.load_shard_set("pipe:exit 3")
    with pytest.raises(D.DataError, match="nosuchproto"):
        D.load_shard_set("nosuchproto://bucket/train")
