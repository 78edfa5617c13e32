"""Remote shards over a flaky store (issue #27): retried reads that resume where the body broke give the bytes, the
samples and the training of local disk; a shard that stays unreadable stops the run with one line; --shard-cache
downloads each shard once per node (atomic, verified, LRU-evicted, never under a reader).

The store is tests/fault_server.py: http.server in a thread on 127.0.0.1 with seeded 503s, resets and stalls."""
import json
import multiprocessing
import os
import time

import pytest

from fault_server import FaultServer
from shard_fixtures import write_shards

from common import fsio, remote, shard_cache, shards
from training import data as D


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    info = write_shards(str(root / "s"), num_ids=16, shard_size=16)  # 64 pairs in 4 shards of ~70 kB
    return {"root": str(root), **info, "bytes": sum(os.path.getsize(p) for p in info["shards"])}


@pytest.fixture
def fast_retries(monkeypatch):
    """A short timeout and almost no backoff, as --data-timeout 0.3 --read-backoff 0.001 would set them."""
    monkeypatch.setattr(fsio, "read_timeout_s", 0.3)
    monkeypatch.setattr(remote, "policy", remote.RetryPolicy(retries=8, backoff_s=0.001))
    monkeypatch.setattr(shard_cache, "cache", None)
    remote.drain()


def _serve(tiny, **faults) -> FaultServer:
    return FaultServer(tiny["root"], **faults)


def _url(server, tiny, path) -> str:
    return f"{server.url}/{os.path.relpath(path, tiny['root'])}"


def _spec(server, tiny):
    return f"{server.url}/s/train/train-{{000000..000003}}.tar"


def _samples(url):
    problems = []
    read = shards.iter_samples(url, lambda u, p: problems.append(p))
    out = [{k: v for k, v in s.items() if k != "__url__"} for s in read]
    assert not problems, problems
    return out


# --------------------------------------------------------------------------------------------------------------------
# Retries (in-process, fast)


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_every_shard_read_through_a_flaky_server_has_the_bytes_and_samples_of_local_disk(tiny, fast_retries, ranges):
    # Before: a reset or a stall ended the read (the pairs after it counted lost) and a 503 made the shard unreadable.
    server = _serve(tiny, seed=7, error_p=0.2, reset_p=0.25, stall_p=0.1, stall_s=0.5, ranges=ranges)
    try:
        for path in tiny["shards"]:
            url = _url(server, tiny, path)
            with shards.open_url(url) as f:
                assert f.read() == open(path, "rb").read()
            assert _samples(url) == _samples(path)
        assert server.faults >= 4
        assert remote.drain()["retries"] >= server.faults
    finally:
        server.stop()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_a_read_that_stalls_mid_body_resumes_at_the_byte_where_it_broke(tiny, fast_retries, ranges):
    server = _serve(tiny, ranges=ranges, stall_s=0.5)
    path = tiny["shards"][0]
    try:
        server.script = [("stall", 0.5)]
        assert _samples(_url(server, tiny, path)) == _samples(path)
        size = os.path.getsize(path)
        assert len(server.range_starts) == 1 and 0 < server.range_starts[0] <= size // 2  # resumed, not restarted
        assert remote.drain()["retries"] == 1
        # the stalled GET sent half the body; the resumed one the rest, or (no Range) the whole body again
        assert server.sent == size // 2 + (size - server.range_starts[0] if ranges else size)
    finally:
        server.stop()


def test_a_404_is_not_retried_and_one_error_names_the_shard(tiny, fast_retries):
    server = _serve(tiny)
    path = tiny["shards"][1]
    url = _url(server, tiny, path)
    server.gone.add(url[len(server.url):])
    try:
        with pytest.raises(shards.ShardUnavailable, match=f"shard {url}: not found"):
            _samples(url)
        assert server.gets.count(url[len(server.url):]) == 1
        sset = D.ShardSet(spec="s", urls=[url], counts=[16], split_ids=None)
        with pytest.raises(D.DataError) as e:  # the trainer's reader: the run stops (it is not counted lost)
            list(D.read_shard(sset, url, 16, 0, 0, 16, D.Tally()))
        assert str(e.value).startswith(f"--train-data shard {url}: not found") and "\n" not in str(e.value)
    finally:
        server.stop()


def test_a_store_that_stays_down_fails_after_the_retries_within_bounded_time(tiny, fast_retries):
    server = _serve(tiny, error_p=1.0)
    url = _url(server, tiny, tiny["shards"][0])
    try:
        start = time.monotonic()
        with pytest.raises(shards.ShardUnavailable, match=r"still failing after 8 retries at byte 0 \(last error: "
                                                          r"HTTP 503"):
            _samples(url)
        assert time.monotonic() - start < 10
        assert len(server.gets) == 9
    finally:
        server.stop()


def test_resolving_a_spec_retries_a_busy_store_and_names_one_that_stays_busy(tiny, fast_retries):
    # Before: fsspec's exists GETs every shard whole and calls a 503 "does not exist".
    server = _serve(tiny)
    spec = _spec(server, tiny)
    try:
        server.head_errors = 3
        assert shards.resolve(spec) == [_url(server, tiny, p) for p in tiny["shards"]]
        assert remote.drain()["retries"] == 3 and not [g for g in server.gets if g.endswith(".tar")]
        server.head_errors = 100
        with pytest.raises(shards.ShardUnavailable, match=r"still failing after 8 retries \(last error: HTTP 503"):
            shards.resolve(spec)
        server.head_errors = 100
        with pytest.raises(D.DataError, match=r"^--train-data set .*train-000000.tar: still failing"):
            D.load_shard_set(spec)
    finally:
        server.stop()


def test_backoff_doubles_and_is_bounded(monkeypatch):
    waits = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    reader = remote.RetryingReader.__new__(remote.RetryingReader)
    reader.url, reader.retry, reader.failures, reader.pos, reader.f = "x://y", remote.RetryPolicy(9, 0.5), 0, 0, None

    def fail():
        raise ConnectionResetError("reset")
    with pytest.raises(remote.ReadFailed, match="still failing after 9 retries"):
        reader._attempt(fail)
    assert waits == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]


# --------------------------------------------------------------------------------------------------------------------
# The shard cache (in-process, fast)


def _read_cached(cache, url) -> bytes:
    with cache.open(url) as f:
        return f.read()


def test_the_cache_fetches_each_shard_once_over_three_passes(tiny, fast_retries, tmp_path):
    server = _serve(tiny, seed=3, reset_p=0.3)
    cache = shard_cache.ShardCache(str(tmp_path / "cache"))
    try:
        for _ in range(3):
            for path in tiny["shards"]:
                assert _read_cached(cache, _url(server, tiny, path)) == open(path, "rb").read()
        counts = remote.drain()
        assert counts["cache_misses"] == 4 and counts["cache_hits"] == 8
        assert counts["bytes_fetched"] == tiny["bytes"]
        assert server.faults > 0 and server.sent >= tiny["bytes"]
        assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".part")]
    finally:
        server.stop()


def test_a_cache_smaller_than_the_set_evicts_the_least_recently_used(tiny, fast_retries, tmp_path):
    server = _serve(tiny)
    a, b, c = tiny["shards"][:3]
    sizes = sorted(os.path.getsize(p) for p in tiny["shards"])
    cache = shard_cache.ShardCache(str(tmp_path / "cache"), limit_bytes=sizes[-1] + sizes[-2])  # any 2, never 3
    try:
        for path in (a, b, a, c, a, b):  # misses: a, b, c (evicts b: a was used since), b (evicts c)
            _read_cached(cache, _url(server, tiny, path))
            time.sleep(0.01)  # distinct last-use times
        counts = remote.drain()
        assert (counts["cache_misses"], counts["cache_hits"]) == (4, 2)
        assert counts["bytes_fetched"] == sum(os.path.getsize(p) for p in (a, b, c, b)) == server.sent
    finally:
        server.stop()


def test_a_truncated_cached_file_or_a_download_left_half_done_is_fetched_again(tiny, fast_retries, tmp_path):
    server = _serve(tiny)
    cache = shard_cache.ShardCache(str(tmp_path / "cache"))
    urls = [_url(server, tiny, p) for p in tiny["shards"][:3]]
    try:
        for url in urls:
            _read_cached(cache, url)
        first, second, third = (cache._base(u) for u in urls)
        with open(first, "r+b") as f:  # a file cut short under its real name
            f.truncate(os.path.getsize(first) // 2)
        os.replace(second, second + ".part")  # a download killed before its rename
        os.remove(third + ".json")  # a file without its record
        remote.drain()
        for url, path in zip(urls, tiny["shards"]):
            assert _read_cached(cache, url) == open(path, "rb").read()
        assert remote.drain()["cache_misses"] == 3
    finally:
        server.stop()


def test_a_cached_file_that_is_not_what_the_manifest_lists_is_fetched_again(tiny, fast_retries, tmp_path):
    import hashlib
    import shutil
    split = tmp_path / "set" / "train"  # a split whose manifest.json lists each shard's sha256, as make_shards writes
    split.mkdir(parents=True)
    listed = []
    for p in tiny["shards"]:
        shutil.copy(p, split)
        listed.append({"name": os.path.basename(p), "count": 16,
                       "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()})
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({"format_version": 1,
                                                                 "splits": {"train": {"shards": listed}}}))
    server = FaultServer(str(tmp_path))
    cache = shard_cache.ShardCache(str(tmp_path / "cache"))
    path = tiny["shards"][0]
    url = f"{server.url}/set/train/{os.path.basename(path)}"
    try:
        _read_cached(cache, url)
        base = cache._base(url)
        with open(base, "r+b") as f:  # same size, other bytes, and a record saying so
            f.write(b"x" * 512)
        record = json.load(open(base + ".json"))
        json.dump({**record, "sha256": "0" * 64}, open(base + ".json", "w"))
        remote.drain()
        with cache.open(url, shards._listed_sha256) as f:
            assert f.read() == open(path, "rb").read()
        assert remote.drain()["cache_misses"] == 1
        (split / os.path.basename(path)).write_bytes(b"y" * 1024)  # the store's copy damaged: refused, not cached
        os.remove(base)
        with pytest.raises(remote.ReadFailed, match="sha256 is not the one its manifest.json lists"):
            cache.open(url, shards._listed_sha256)
        assert not os.path.exists(base) and not os.path.exists(base + ".part")
    finally:
        server.stop()


def test_eviction_never_removes_a_file_being_read(tiny, fast_retries, tmp_path):
    server = _serve(tiny)
    cache = shard_cache.ShardCache(str(tmp_path / "cache"), limit_bytes=1)  # holds nothing it need not
    a, b, c = (_url(server, tiny, p) for p in tiny["shards"][:3])
    try:
        held = cache.open(a)
        _read_cached(cache, b)  # over the limit: a would go, but it is being read
        assert os.path.exists(cache._base(a)) and held.read() == open(tiny["shards"][0], "rb").read()
        held.close()
        _read_cached(cache, c)  # now a and b go
        assert not os.path.exists(cache._base(a)) and not os.path.exists(cache._base(b))
    finally:
        server.stop()


def _open_in_child(root, url, out):
    cache = shard_cache.ShardCache(root)
    with cache.open(url) as f:
        out.put(len(f.read()))


def test_processes_of_one_node_download_a_shard_once(tiny, fast_retries, tmp_path):
    server = _serve(tiny, stall_p=0.0)
    url = _url(server, tiny, tiny["shards"][2])
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    try:
        procs = [ctx.Process(target=_open_in_child, args=(str(tmp_path / "c"), url, out)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [out.get(timeout=5) for _ in procs] == [os.path.getsize(tiny["shards"][2])] * 4
        assert server.gets.count(url[len(server.url):]) == 1
    finally:
        server.stop()


def test_local_and_file_urls_are_never_cached(tiny, fast_retries, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_cache, "cache", shard_cache.ShardCache(str(tmp_path / "cache")))
    path = tiny["shards"][0]
    assert _samples(path) == _samples("file://" + path)
    assert os.listdir(tmp_path / "cache") == [] and remote.drain() == {}


@pytest.mark.parametrize("text, size", [("200GB", 200 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("500m", 500 * 10**6),
                                        ("4096", 4096), ("10 MiB", 10 * 2**20)])
def test_cache_sizes_parse(text, size):
    assert shard_cache.parse_size(text) == size


@pytest.mark.parametrize("argv, message", [
    (["--shard-cache", "C", "--shard-cache-size", "lots"], "--shard-cache-size: expected a size such as 200GB"),
    (["--shard-cache-size=-3GB", "--shard-cache", "C"], "--shard-cache-size: expected a size"),
    (["--shard-cache-size", "2GB"], "--shard-cache-size: needs --shard-cache DIR"),
    (["--read-retries", "-1"], "--read-retries: must be >= 0"),
])
def test_bad_cache_and_retry_flags_are_one_error_line_naming_the_flag(argv, message, capsys):
    from training.params import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x", *argv])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("src/training/main.py: error: ") and message in last and "Traceback" not in err, err


def test_counters_of_a_forked_worker_start_from_zero():
    remote.count("bytes_fetched", 5)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=lambda: out.put(remote.drain()))
    p.start()
    p.join(10)
    assert out.get(timeout=5) == {} and remote.drain() == {"bytes_fetched": 5}


# --------------------------------------------------------------------------------------------------------------------
# Training over the flaky store (whole runs: slow tier)


def _train_args(spec, logs, name, *extra):
    return [str(a) for a in ("--train-data", spec, "--model", "PersonTiny", "--batch-size", 8, "--workers", 2,
                             "--epochs", 2, "--logs-dir", logs, "--name", name, "--warmup", 2, "--log-keys",
                             "--log-every-n-steps", 1, "--loss", "fastclip-v3", "--seed", 3, "--data-timeout", 0.3,
                             "--read-backoff", 0.001, "--read-retries", 8, *extra)]


def _keys(run):
    return [json.loads(line)["keys"] for line in open(run / "keys_rank0.jsonl")]


def _final(run):
    import torch
    return torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=True)


def _same_weights(a, b):
    import torch
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=0, rtol=0, msg=k)
    for k, v in a["loss"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(b["loss"][k], v, atol=0, rtol=0, msg=f"loss {k}")


@pytest.mark.slow
def test_training_over_a_flaky_server_reads_the_pairs_of_local_disk_and_resumes_bit_identically(tiny, tmp_path):
    # Before: the faults' shards were counted lost and refilled with repeats: other keys, other weights.
    from training.main import main
    assert main(_train_args(os.path.dirname(tiny["shards"][0]), tmp_path, "local")) == 0
    server = _serve(tiny, seed=11, error_p=0.15, reset_p=0.2, stall_p=0.1, stall_s=0.6)
    try:
        assert main(_train_args(_spec(server, tiny), tmp_path, "flaky")) == 0
        assert main(_train_args(_spec(server, tiny), tmp_path, "cut", "--max-steps", 5)) == 0
        assert main(_train_args(_spec(server, tiny), tmp_path, "cut", "--resume", "latest")) == 0
        assert server.faults >= 3
    finally:
        server.stop()
    assert _keys(tmp_path / "flaky") == _keys(tmp_path / "local") == _keys(tmp_path / "cut")
    _same_weights(_final(tmp_path / "local"), _final(tmp_path / "flaky"))
    _same_weights(_final(tmp_path / "local"), _final(tmp_path / "cut"))
    summary = json.loads((tmp_path / "flaky" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert sum(e["remote"].get("retries", 0) for e in summary["data"].values()) >= 1
    assert "remote reads: " in (tmp_path / "flaky" / "out.log").read_text()


@pytest.mark.slow
def test_a_shard_that_stays_404_ends_the_run_with_one_error_line_naming_it(tiny, tmp_path, monkeypatch):
    # Before: its pairs were counted lost (unreadable_shard) and refilled; the run went on.
    from training import trainer as trainer_mod
    from training.main import main
    server = _serve(tiny)
    gone, opened, real_step, real_iter = [], set(), trainer_mod.train_step, shards.iter_samples

    def iter_samples(url, *a, **k):
        opened.add(url[len(server.url):])
        return real_iter(url, *a, **k)

    def train_step(*a, **k):  # after the first step, a shard not opened yet answers 404 from then on
        if not gone:
            gone.append(next(f"/s/train/{os.path.basename(p)}" for p in tiny["shards"]
                             if f"/s/train/{os.path.basename(p)}" not in opened))
            server.gone.add(gone[0])
        return real_step(*a, **k)
    monkeypatch.setattr(shards, "iter_samples", iter_samples)
    monkeypatch.setattr(trainer_mod, "train_step", train_step)
    start = time.monotonic()
    try:
        with pytest.raises(SystemExit) as e:
            main(_train_args(_spec(server, tiny), tmp_path, "gone", "--workers", 0, "--shuffle-buffer", 4,
                             "--data-readers", 1))  # one reader: the shards are opened one after the other
    finally:
        server.stop()
    msg = str(e.value)
    assert msg.startswith(f"error: --train-data shard {server.url}{gone[0]}: not found") and "\n" not in msg, msg
    assert time.monotonic() - start < 120
    assert (tmp_path / "gone" / "checkpoints" / "latest.pt").is_file()
    assert json.loads((tmp_path / "gone" / "summary.json").read_text())["status"] == "stopped: data error"


@pytest.mark.slow
def test_three_epochs_with_a_shard_cache_fetch_the_set_about_once(tiny, tmp_path):
    # Before: no --shard-cache; every epoch downloaded the whole set again (3x).
    from training.main import main
    server = _serve(tiny, only=".none")  # no faults: the bytes sent are the bytes of the shards fetched
    spec = _spec(server, tiny)
    try:
        base = server.sent
        assert main(_train_args(spec, tmp_path, "cached", "--epochs", 3, "--shard-cache", tmp_path / "c")) == 0
        whole = server.sent - base
        gets = len(server.gets)
        small = os.path.getsize(tiny["shards"][0])  # a cache that keeps nothing beyond the shard last read
        assert main(_train_args(spec, tmp_path, "small", "--epochs", 3, "--workers", 0, "--data-readers", 1,
                                "--shard-cache", tmp_path / "s", "--shard-cache-size", small)) == 0
        fetched = [os.path.join(tiny["root"], g.lstrip("/")) for g in server.gets[gets:] if g.endswith(".tar")]
    finally:
        server.stop()
    assert tiny["bytes"] <= whole <= 1.5 * tiny["bytes"]
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    counts = [summary["data"][str(e)]["remote"] for e in range(3)]
    # 8 readers of 8 pairs (global batch 8): each 16-pair shard is opened by two readers, the second open a hit
    assert [c.get("cache_misses", 0) for c in counts] == [4, 0, 0] and [c["cache_hits"] for c in counts] == [4, 8, 8]
    # the small cache: every shard opened is fetched whole unless it is the one read last (an epoch's last shard
    # may open the next epoch): 3 epochs x 4 shards, less at most one hit per epoch boundary
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    misses = sum(e["remote"].get("cache_misses", 0) for e in summary["data"].values())
    hits = sum(e["remote"].get("cache_hits", 0) for e in summary["data"].values())
    assert misses + hits == 12 and hits <= 2 and len(fetched) == misses
    assert sum(e["remote"]["bytes_fetched"] for e in summary["data"].values()) >= sum(map(os.path.getsize, fetched))
