"""The one shard module (common/shards.py): byte-exact packing, reading with its problem rules, spec resolution,
and the one-way import layering it is part of."""
import ast
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from common import shards

ROOT = Path(__file__).resolve().parents[1]


def golden_samples():
    out = []
    for k in range(3):
        jpg = bytes([0xFF, 0xD8]) + bytes((k * 7 + i) % 256 for i in range(700 + k * 300))
        cap = ["a woman in a red coat", "un homme en café-brun veste", "x" * 511][k]
        meta = {"key": k, "pid": k // 2, "orig_id": f"id{k // 2}", "source": "synthetic", "image": f"p/{k}.jpg",
                "image_id": k, "caption_id": 0}
        out.append(shards.make_sample(k, jpg, cap, meta))
    return out


def test_pack_is_byte_identical_to_the_format_before_webdataset_tarwriter():
    # The sha256 was taken from the hand-written tar code that packed every shard before this module (commit
    # 8dfa563, data_prep/writer.py): shards made before and after must hash alike, or re-runs would rewrite them.
    data = shards.pack(golden_samples())
    assert len(data) == 20480
    assert hashlib.sha256(data).hexdigest() == "8de825298b61d8d8c8ab3fa9b4112319fd7cd0a86099de4c9191b2d9d7ed1481"
    assert sum(shards.tar_size(s) for s in golden_samples()) == 11264  # what --maxsize counts


def test_packed_members_have_fixed_metadata_and_are_read_back_by_tarfile():
    with tarfile.open(fileobj=io.BytesIO(shards.pack(golden_samples()))) as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert names == [f"00000000{k}.{e}" for k in range(3) for e in ("jpg", "json", "txt")]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
        assert tf.extractfile("000000001.txt").read().decode() == "un homme en café-brun veste"


def _read(data: bytes, expected=None):
    problems = []
    got = list(shards.iter_samples("x.tar", lambda u, m: problems.append((u, m)), expected=expected,
                                   stream=io.BytesIO(data)))
    return got, problems


def test_iter_samples_round_trip():
    got, problems = _read(shards.pack(golden_samples()), expected=3)
    assert problems == []
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "000000002"]
    assert got[2]["txt"] == b"x" * 511 and json.loads(got[1]["json"])["orig_id"] == "id0"
    assert all(s["__url__"] == "x.tar" for s in got)


def test_member_cut_short_drops_only_its_sample_and_reports_once():
    data = shards.pack(golden_samples())
    # cut inside the data of sample 1's jpg (its header is at 3*512 + 2*512 (sample 0) = ...): find it by offset
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = tf.getmember("000000001.jpg")
    got, problems = _read(data[: m.offset_data + 100], expected=3)
    assert [s["__key__"] for s in got] == ["000000000"]
    assert len(problems) == 1 and problems[0][0] == "x.tar"


def test_truncation_at_a_member_boundary_is_caught_by_the_count():
    data = shards.pack(golden_samples())
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = tf.getmember("000000002.jpg")
    got, problems = _read(data[: m.offset], expected=3)  # tarfile itself stops silently here
    assert [s["__key__"] for s in got] == ["000000000", "000000001"]
    assert problems == [("x.tar", "2 samples where sizes.json lists 3")]
    got, problems = _read(data[: m.offset])  # no count to check against: nothing to report
    assert len(got) == 2 and problems == []


def test_not_a_tar_is_a_problem_not_an_exception():
    got, problems = _read(b"this is not a tar archive at all" * 40)
    assert got == [] and len(problems) == 1


def test_shards_are_readable_by_webdataset(tmp_path):
    import webdataset as wds

    (tmp_path / "a.tar").write_bytes(shards.pack(golden_samples()))
    ds = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False).to_tuple("__key__", "txt", "json"))
    assert [k for k, *_ in ds] == ["000000000", "000000001", "000000002"]
    assert ds[1][1].decode() == "un homme en café-brun veste"


def test_resolve_every_spec_form(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    for i in range(3):
        (d / f"train-{i:06d}.tar").write_bytes(shards.pack(golden_samples()[i:i + 1]))
    (d / "notes.txt").write_text("x")
    want = [str(d / f"train-{i:06d}.tar") for i in range(3)]
    assert shards.resolve(str(d)) == want
    assert shards.resolve(str(d / "train-{000000..000002}.tar")) == want
    assert shards.resolve(str(d / "train-*.tar")) == want
    lst = tmp_path / "list.txt"
    lst.write_text("# shards\ntrain/train-000001.tar\n\n" + want[2] + "\n")
    assert shards.resolve(str(lst)) == want[1:]
    assert shards.resolve(f"file://{d}") == [f"file://{p}" for p in want]
    for bad, msg in ((str(d / "train-000009.tar"), "does not exist"), (str(d / "x-*.tar"), "matches no shard"),
                     (str(tmp_path), "without any \\*.tar"), (f"file://{d}/nope.tar", "does not exist")):
        with pytest.raises(shards.ShardError, match=msg):
            shards.resolve(bad)


def test_index_files(tmp_path):
    d = tmp_path / "out" / "val"
    d.mkdir(parents=True)
    assert shards.read_sizes(str(d)) is None and shards.read_split_info(str(d)) is None
    (d / "sizes.json").write_bytes(shards.sizes_json({"val-000000.tar": 3}))
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({"splits": {"val": {"identities": 2}}}))
    assert shards.read_sizes(str(d)) == {"val-000000.tar": 3}
    assert shards.read_split_info(str(d)) == {"identities": 2}
    (d / "sizes.json").write_text("{not json")
    with pytest.raises(shards.ShardError, match="not valid JSON"):
        shards.read_sizes(str(d))


def test_a_pipe_line_in_a_list_file_is_refused_and_runs_nothing(tmp_path, capsys):
    from evaluation.evaluate import default_datasets
    from fast_clip.retrieval.testset import EvalError, load_test_set
    from training.data import DataError, load_shard_set

    (tmp_path / "a.tar").write_bytes(shards.pack(golden_samples()))
    planted = tmp_path / "planted"
    lst = tmp_path / "shards.txt"  # as shipped with a data set
    lst.write_text(f"# shards\na.tar\n  pipe:touch {planted}\n")
    said = (f"shard list {str(lst)!r} line 3: 'pipe:touch {planted}' is a shell command; pipe: is taken only from a "
            f"spec given on the command line, never from a list file")
    with pytest.raises(shards.ShardError) as e:
        shards.resolve(str(lst))
    assert str(e.value) == said
    with pytest.raises(DataError) as e:  # the trainer's --train-data
        load_shard_set(str(lst))
    assert str(e.value) == f"--train-data set {str(lst)!r}: {said}"
    with pytest.raises(EvalError) as e:  # the evaluator's --data
        load_test_set(str(lst))
    assert str(e.value) == f"--data: {said}"
    assert default_datasets(str(lst)) == {}  # a run's params.json train_data: warned, nothing looked up
    assert said in capsys.readouterr().err
    assert default_datasets(f"pipe:touch {planted}") == {}  # nor is a pipe: train_data of params.json run by eval
    assert not planted.exists()
    # pipe: given as the spec itself (the command line) is still a shard
    assert load_test_set(f"pipe:cat {tmp_path}/a.tar").num_queries == 3


@pytest.mark.parametrize("count, says", [
    (-1, "is not a sample count (an integer >= 0)"),
    (2.5, "is not a sample count (an integer >= 0)"),
    ("3", "is not a sample count (an integer >= 0)"),
    (True, "is not a sample count (an integer >= 0)"),
    (10 ** 15, "is more than any shard holds (at most 1000000000)"),
    (41, "is more than its 20480 bytes can hold (one 512-byte header per sample at least)"),
])
def test_a_hostile_count_in_an_index_file_is_one_error_naming_file_and_shard(tmp_path, count, says):
    from training.data import DataError, load_shard_set

    d = tmp_path / "train"
    d.mkdir()
    (d / "train-000000.tar").write_bytes(shards.pack(golden_samples()))  # 20480 bytes: room for 40 headers
    (d / "sizes.json").write_text(json.dumps({"train-000000.tar": count}))
    said = f"{d}/sizes.json: shard 'train-000000.tar': count {count!r} {says}"
    with pytest.raises(shards.ShardError) as e:
        shards.read_sizes(str(d))
    assert str(e.value) == said
    with pytest.raises(DataError) as e:  # the trainer's --train-data: one line, before any allocation
        load_shard_set(str(d))
    assert str(e.value) == f"--train-data set {str(d)!r}: {said}"
    (d / "sizes.json").unlink()
    (d / "train-000000_stats.json").write_text(json.dumps({"successes": count}))  # img2dataset's index
    if isinstance(count, int) and not isinstance(count, bool):
        with pytest.raises(shards.ShardError, match=f"train-000000_stats.json: shard 'train-000000.tar': count"):
            shards.read_stats_counts(str(d), ["train-000000.tar"])
    (d / "sizes.json").write_text(json.dumps({"train-000000.tar": 40}))
    assert shards.read_sizes(str(d)) == {"train-000000.tar": 40}  # as many as the headers allow: accepted


# Imports only go down: tools -> (training | evaluation) -> fast_clip -> common. data_prep sits beside fast_clip and
# uses only common; training and evaluation never import each other's modules.
ALLOWED = {
    "common": {"common"},
    "fast_clip": {"fast_clip", "common"},
    "data_prep": {"data_prep", "common"},
    "evaluation": {"evaluation", "fast_clip", "common"},
    "training": {"training", "fast_clip", "common"},
}
OURS = ("common", "fast_clip", "data_prep", "evaluation", "training")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from (f"{node.module}.{a.name}" for a in node.names)


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_imports_only_go_down(pkg):
    base = ROOT / ("data_prep" if pkg == "data_prep" else f"src/{pkg}")
    bad = []
    for f in sorted(base.rglob("*.py")):
        for mod in _imports(f):
            if mod.split(".")[0] in OURS and not any(mod == a or mod.startswith(a + ".") for a in ALLOWED[pkg]):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert bad == []


# ---------------------------------------------------------------------------------------------------------------
# Skipping to a sample by the tar headers (a reader whose range starts inside a shard)


def _tar(path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def _read_from(url, start=0):
    problems, seen = [], {}
    got = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in
           shards.iter_samples(url, lambda u, p: problems.append(p), start=start, seen=seen)]
    return got, seen.get("samples"), problems


@pytest.mark.parametrize("layout", ["plain", "meta-members", "dirs-and-prefix", "long-name", "duplicate", "cut"])
def test_skipping_to_a_sample_reads_what_reading_through_reads(tmp_path, layout):
    members = []
    for k in range(7):
        members += [(f"{k:06d}.jpg", b"j" * (100 + 37 * k)), (f"{k:06d}.txt", b"caption %d" % k)]
        if layout == "meta-members" and k == 2:
            members += [("__meta__", b"x"), (".hidden", b"y"), ("noext", b"z")]
    if layout == "dirs-and-prefix":  # keys with folders; a name longer than 100 bytes goes to the ustar prefix
        members = [(("d" * 90) + f"/sub/{n}", data) for n, data in members]
    if layout == "long-name":        # a member name tarfile can only store in a pax header: the slow path
        members[6] = ("x" * 120 + "/000003.jpg", b"j")
    if layout == "duplicate":        # a repeated member: webdataset stops there; so must the skip
        members.insert(5, members[4])
    # (tarfile's default PAX format puts a long name in a pax header; the ustar format splits it into the prefix)
    path = _tar(tmp_path / "s.tar", members, tarfile.USTAR_FORMAT if layout == "dirs-and-prefix" else tarfile.PAX_FORMAT)
    if layout == "cut":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    whole, n, problems = _read_from(path)
    for start in range(0, len(whole) + 3):
        got, n_start, problems_start = _read_from(path, start)
        assert got == whole[start:], (layout, start)
        assert (n_start, problems_start) == (n, problems), (layout, start)
    with open(path, "rb") as f:
        fast = shards._seek_sample(f, 3)
        assert fast == (layout in ("plain", "meta-members", "dirs-and-prefix", "cut")), layout
        assert f.tell() > 0 if fast else f.tell() == 0


def test_the_skip_reads_only_headers(tmp_path):
    members = [(f"{k:06d}.{ext}", b"\x01" * 5000) for k in range(40) for ext in ("jpg", "txt")]
    path = _tar(tmp_path / "s.tar", members)
    with open(path, "rb") as f:
        read = []
        real = f.read
        f.read = lambda n=-1: read.append(n) or real(n)  # noqa: E731
        assert shards._seek_sample(f, 39)
    assert set(read) == {512} and len(read) == 78 + 1  # 78 headers passed, the 79th (sample 39's) read to stop there
