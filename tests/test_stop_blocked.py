"""SIGTERM while the trainer is blocked on a server that accepts and never answers: the run stops within seconds with
one line, not after aiohttp's 5-minute timeout with a traceback (issue #25)."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from shard_fixtures import write_shards
from test_training import ENV, MAIN, PY

# Serves DIR over HTTP; a read (a GET: the shards' reads, not the HEAD that checks they exist) of a path containing
# HANG, or any request when HANG is "/", is accepted and never answered.
SERVER = r"""
import http.server, functools, sys, time
directory, hang, port_file = sys.argv[1], sys.argv[2], sys.argv[3]
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if hang == "/" or hang in self.path:
            time.sleep(3600)
        return super().do_GET()
    def do_HEAD(self):
        if hang == "/":
            time.sleep(3600)
        return super().do_HEAD()
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=directory))
open(port_file, "w").write(str(s.server_address[1]))
s.serve_forever()
"""


@pytest.fixture
def server(tmp_path):
    procs = []

    def start(directory, hang):
        port_file = tmp_path / f"port{len(procs)}"
        p = subprocess.Popen([sys.executable, "-c", SERVER, str(directory), hang, str(port_file)])
        procs.append(p)
        for _ in range(100):
            if port_file.exists() and port_file.read_text():
                return f"http://127.0.0.1:{port_file.read_text()}"
            time.sleep(0.1)
        raise RuntimeError("test server did not start")
    yield start
    for p in procs:  # bounded: the test ends the server it started
        p.kill()
        p.wait()


def _train(tmp_path, data, *extra):
    argv = ["--train-data", data, "--model", "PersonTiny", "--batch-size", "8", "--workers", "1", "--epochs", "1",
            "--logs-dir", str(tmp_path / "logs"), "--name", "r", "--warmup", "1", *extra]
    return subprocess.Popen([PY, MAIN, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sigterm_after(p, seconds: float, log=None, line: str = "") -> tuple[float, str, str]:
    """SIGTERM ``seconds`` after ``line`` appears in ``log`` (or after start): (seconds to the end, stdout, stderr)."""
    for _ in range(900 if log else 0):  # the loop has started (the build takes a while on a loaded machine)
        if log.exists() and line in log.read_text() or p.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(seconds)
    assert p.poll() is None, p.communicate()
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("SIGTERM did not stop the run within 60 s")
    return time.time() - t0, out, err


@pytest.mark.slow
def test_sigterm_while_the_build_waits_on_a_silent_server_stops_with_one_line(tmp_path, server):
    url = server(tmp_path, "/")  # every request hangs: the build's first read of sizes.json / the listing
    p = _train(tmp_path, f"{url}/train/train-{{000000..000003}}.tar")
    took, out, err = _sigterm_after(p, 8, tmp_path / "logs" / "r" / "out.log", "| run ")
    assert took < 30 and p.returncode != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: stopped by SIGTERM while the run was being built"), err
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_sigterm_while_the_loader_waits_on_a_silent_server_stops_and_writes_latest(tmp_path, server):
    info = write_shards(str(tmp_path / "s"), num_ids=8, shard_size=8)
    url = server(tmp_path / "s", ".tar")  # sizes.json answers, every shard read hangs
    p = _train(tmp_path, f"{url}/train/train-{{000000..000003}}.tar")
    run = tmp_path / "logs" / "r"
    took, out, err = _sigterm_after(p, 3, run / "out.log", "steps in all")
    assert took < 30 and p.returncode == 0, err
    assert "Traceback" not in err, err
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped by SIGTERM"
    assert (run / "checkpoints" / "latest.pt").exists()  # as at any stop: --resume latest continues from here
    assert "SIGTERM: stopped after step 0, latest.pt written" in (run / "out.log").read_text()


@pytest.mark.slow  # a whole training run or a process of its own
def test_a_silent_server_is_an_error_after_the_data_timeout(tmp_path, server):
    # the timeout ends each try; common.remote retries a stall (2 retries, 0.5 s then 1 s apart here): 3 x 1 s + 1.5 s
    from common import fsio, remote, shards
    url = server(tmp_path, "/")
    fsio.read_timeout_s, before = 1.0, fsio.read_timeout_s
    policy, remote.policy = remote.policy, remote.RetryPolicy(retries=2, backoff_s=0.5)
    try:
        t0 = time.time()
        with pytest.raises(Exception):
            with shards.open_url(f"{url}/x.tar") as f:
                f.read()
        assert time.time() - t0 < 20
    finally:
        fsio.read_timeout_s, remote.policy = before, policy


@pytest.mark.slow
def test_sigterm_while_two_ranks_wait_on_a_silent_server_ends_after_the_grace(tmp_path, server):
    """With several ranks a waiting rank gives its batch the grace (another rank may be inside a step that needs
    it), then ends with one error line; nothing is written over the last latest.pt."""
    write_shards(str(tmp_path / "s"), num_ids=8, shard_size=8)
    url = server(tmp_path / "s", ".tar")
    argv = ["--train-data", f"{url}/train/train-{{000000..000003}}.tar", "--model", "PersonTiny", "--batch-size", "4",
            "--workers", "1", "--epochs", "1", "--logs-dir", str(tmp_path / "logs"), "--name", "r", "--warmup", "1"]
    p = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", MAIN, *argv],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "logs" / "r"
    took, out, err = _sigterm_after(p, 3, run / "out.log", "steps in all")
    assert took < 60 and p.returncode != 0, err
    assert "error: stopped by SIGTERM on rank 0 after waiting 10 s more for its next batch" in err, err
    assert not (run / "checkpoints" / "latest.pt").exists()
