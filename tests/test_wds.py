"""WebDataset inputs: samples by webdataset's key rule, every key one row, damaged shards and img2dataset's
sidecars recorded rather than dropped, key prefixes across shards; and `po-batch run` over real tar shards."""

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_pipeline import markers, picture, plan_units, run, summary

from po_batch.config import ConfigError, config_from_dict, load_config
from po_batch.data.plan import PlanError, load_or_create_plan, units_of
from po_batch.data.readers.listing import list_inputs
from po_batch.data.readers.wds import WdsReader
from po_batch.data.store import LocalStore
from po_batch.spec import open_spec


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar as webdataset's TarWriter writes one: regular members in order, as given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_sidecar(shard: Path, rows: list[dict]) -> None:
    """img2dataset's per-shard Parquet: key, status, error_message and the sample's metadata."""
    pq.write_table(pa.Table.from_pylist(rows), shard.with_suffix(".parquet"))


def read_all(reader: WdsReader, file: str, entry: dict | None = None):
    """(rows as dicts with their image and error, notes) of one shard, read as its own unit."""
    entry = entry or reader.describe(file, 100)[0]
    rows, errors, notes = [], {}, {}
    for batch in reader.read(units_of(entry, 0)[0], entry):
        rows += [r | {"image": im} for r, im in zip(batch.table.to_pylist(), batch.images)]
        errors |= batch.errors
        notes |= batch.notes
    for i, r in enumerate(rows):
        r["error"] = str(errors[i]) if i in errors else None
    assert len(rows) == entry["rows"]
    return rows, notes


def member_json(**fields) -> bytes:
    return json.dumps(fields).encode()


# --- the reader -------------------------------------------------------------------------------------

def test_every_key_is_one_row_and_what_is_wrong_with_it_is_its_error(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [
        ("a1.jpg", b"A1"), ("a1.json", member_json(caption="one", width=448, tags=["x"])), ("a1.cls", b"3\n"),
        ("dir/photo.v2.final.jpg", b"P"), ("dir/photo.v2.final.json", member_json(caption="dots")),
        ("a2.json", member_json(caption="no image")), ("a2.txt", b"text only"),
        ("a3.jpg", b"A3"), ("a3.json", b"{not json"),
        ("a4.jpg", b"A4"), ("a5.jpg", b"A5"), ("a4.json", member_json(caption="late")),  # a4 split by a5
        ("a6.jpg", b"A6"), ("a6.png", b"A6 again"),
        ("a5.jpg", b"A5 again"),  # a5 twice
        ("__meta__", b"skipped as webdataset skips it"), ("README", b"no extension"),
        ("a7.JPG", b"A7"), ("a7.txt", "héllo".encode()),
    ])
    reader = WdsReader(("caption", "width", "tags", "cls", "txt"))
    rows, notes = read_all(reader, str(shard))
    got = {r["__key__"]: r for r in rows}
    assert list(got) == ["a1", "dir/photo", "a2", "a3", "a4", "a5", "a6", "a7"]
    assert got["a1"] == {"__key__": "a1", "caption": "one", "width": "448", "tags": '["x"]', "cls": "3",
                              "txt": None, "image": b"A1", "error": None}
    assert (got["dir/photo"]["image"], got["dir/photo"]["caption"], got["dir/photo"]["error"]) == (b"P", "dots", None)
    assert got["a2"]["image"] is None and got["a2"]["txt"] == "text only"
    assert got["a2"]["error"] == "missing: sample a2 has no image member (.jpeg/.jpg/.png/.webp); it has .json, .txt"
    assert got["a3"]["error"].startswith("corrupt: a3.json is not valid JSON")
    assert got["a4"]["error"] == ("split_key: the members of key a4 are not adjacent in s.tar (.json come after other "
                                  "keys)")
    assert got["a5"]["error"].startswith("duplicate_key: key a5 appears more than once in s.tar")
    assert got["a6"]["error"].startswith("ambiguous: sample a6 has several image members (.jpg, .png)")
    assert (got["a7"]["image"], got["a7"]["txt"], got["a7"]["error"]) == (b"A7", "héllo", None)
    assert notes == {"members_ignored": 2, "repeated_keys": 2}  # __meta__ and README: no sample's


def test_a_key_seen_again_after_its_row_was_handed_on_still_gets_its_error(tmp_path):
    members = [(f"k{i:03d}.jpg", b"x") for i in range(600)] + [("k005.jpg", b"again"), ("k150.json", b"{}")]
    reader = WdsReader()
    entry = reader.describe(str(write_shard(tmp_path / "s.tar", members)), 100)[0]
    batches = list(reader.read(units_of(entry, 0)[0], entry))
    assert len(batches) > 2 and batches[-1].notes == {"repeated_keys": 2}
    first = next(k for k, b in enumerate(batches) if 5 in b.errors)
    assert first > 0 and sum(b.table.num_rows for b in batches[:first]) > 5  # arrived with a later batch
    rows, _ = read_all(reader, str(tmp_path / "s.tar"))
    assert [(i, r["error"].split(":")[0]) for i, r in enumerate(rows) if r["error"]] == [(5, "duplicate_key"),
                                                                                      (150, "split_key")]


def test_text_only_reading_wants_no_image_and_a_narrower_extension_list_resolves_two(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [("a.txt", b"t"), ("b.jpg", b"B"), ("b.seg.png", b"mask")])
    rows, _ = read_all(WdsReader(("txt",), images=False), str(shard))
    assert [(r["__key__"], r["image"], r["error"]) for r in rows] == [("a", None, None), ("b", None, None)]
    rows, _ = read_all(WdsReader((), image_extensions=("jpg",)), str(shard))
    assert rows[1]["image"] == b"B" and rows[1]["error"] is None


def tar_of(n: int, size: int = 700) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext in ("jpg", "json"):
                data = bytes([i]) * size if ext == "jpg" else member_json(caption=f"c{i}")
                info = tarfile.TarInfo(f"k{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


KEY_BYTES = 512 + 1024 + 512 + 512  # a key of tar_of: the .jpg's header and data, the .json's


@pytest.mark.parametrize("cut, keys, why", [
    (2 * KEY_BYTES + 712, 2, f"it ends at byte {2 * KEY_BYTES + 712}, inside member k02.jpg"),  # inside its data
    (4 * KEY_BYTES + 100, 4, f"it ends at byte {4 * KEY_BYTES + 100}, inside a header"),
    (3 * KEY_BYTES, 3, f"it ends at byte {3 * KEY_BYTES}, without an end-of-archive marker"),  # between members
])
def test_a_truncated_tar_keeps_the_rows_before_the_break_and_says_where_it_broke(tmp_path, cut, keys, why):
    whole = tar_of(6)
    shard = tmp_path / "s.tar"
    shard.write_bytes(whole[:cut])
    reader = WdsReader(("caption",))
    entry, _ = reader.describe(str(shard), 100)
    assert entry["rows"] == keys and "truncated" in entry
    rows, notes = read_all(reader, str(shard), entry)
    assert [r["__key__"] for r in rows] == [f"k{i:02d}" for i in range(keys)]
    assert all(r["error"] is None and r["caption"] == f"c{i}" for i, r in enumerate(rows))
    assert notes["truncated"].startswith(why) and entry["truncated"] == notes["truncated"]
    shard.write_bytes(whole)
    assert "truncated" not in reader.describe(str(shard), 100)[0]


def test_a_compressed_shard_is_read_through_webdatasets_iteration(tmp_path):
    import gzip

    shard = tmp_path / "s.tar.gz"
    whole = gzip.compress(tar_of(6))
    shard.write_bytes(whole)
    reader = WdsReader(("caption",))
    rows, notes = read_all(reader, str(shard))
    assert [r["caption"] for r in rows] == [f"c{i}" for i in range(6)] and notes == {}
    shard.write_bytes(whole[: len(whole) // 2])
    rows, notes = read_all(reader, str(shard))
    assert 0 < len(rows) < 6 and notes["truncated"].startswith("the compressed tar is cut short or damaged")
    assert list_inputs([str(tmp_path)], extensions=WdsReader.extensions) == [str(shard)]


def test_img2dataset_sidecar_rows_failed_downloads_and_keys_a_truncated_tar_lost(tmp_path):
    keys = [f"{i:09d}" for i in range(8)]
    shard = tmp_path / "00000.tar"
    members = []
    for k in keys:
        if k in ("000000002", "000000005"):  # failed downloads: not in the tar
            continue
        members += [(f"{k}.jpg", k.encode() * 100), (f"{k}.json", member_json(caption=f"cap {k}"))]
    members += [("999999999.jpg", b"not listed")]
    data = write_shard(shard, members).read_bytes()
    shard.write_bytes(data[: data.find(b"000000006.jpg") + 512 + 100])  # loses 000000006 on, the unlisted key too
    side = [{"key": k, "status": "failed_to_download" if k in ("000000002", "000000005") else "success",
             "error_message": "HTTP 404" if k in ("000000002", "000000005") else None,
             "caption": f"cap {k}", "url": f"https://example.org/{k}.jpg"} for k in keys]
    write_sidecar(shard, side)

    rows, notes = read_all(WdsReader(("caption", "url")), str(shard))
    got = {r["__key__"]: r for r in rows}
    assert sorted(got) == keys
    assert got["000000002"]["error"] == "download: failed_to_download: HTTP 404"
    assert got["000000002"]["url"] == "https://example.org/000000002.jpg" and got["000000002"]["image"] is None
    lost = [k for k in keys if got[k]["error"] and got[k]["error"].startswith("missing: ")]
    assert lost == ["000000006", "000000007"]
    assert all(got[k]["error"] is None and got[k]["image"] == k.encode() * 100 for k in ("000000000", "000000004"))
    assert "truncated" in notes and notes["missing_keys"].startswith("2 listed keys are not in the tar")

    rows, notes = read_all(WdsReader(("caption",), skip_failed=True), str(shard))
    assert sorted(r["__key__"] for r in rows) == [k for k in keys if k not in ("000000002", "000000005")]

    shard.write_bytes(b"")  # whole again, with the unlisted key
    write_shard(shard, members)
    rows, notes = read_all(WdsReader(()), str(shard))
    assert len(rows) == 8 and notes["unlisted_keys"].startswith("1 samples of the tar are not rows of")


def test_keys_that_repeat_across_shards_take_the_shard_name_and_unique_ones_stay(tmp_path):
    def shard(name, keys):
        return write_shard(tmp_path / "in" / name, [(f"{k}.jpg", b"x") for k in keys])

    shard("img-00000.tar", [f"00000{i:04d}" for i in range(3)])  # img2dataset: unique across shards
    shard("img-00001.tar", [f"00001{i:04d}" for i in range(3)])
    shard("restart-a.tar", [f"s{i}" for i in range(3)])  # keys that restart in every shard
    shard("restart-b.tar", [f"s{i}" for i in range(3)])
    out, inputs, reader = LocalStore(tmp_path / "out"), [str(tmp_path / "in" / "*.tar")], WdsReader()
    plan = load_or_create_plan(out, inputs, 100, {}, reader=reader, columns=reader.columns)
    ids = {Path(f).name: [r["__key__"] for r in read_all(reader, f, plan.files[f])[0]] for f in plan.files}
    assert ids == {"img-00000.tar": ["000000000", "000000001", "000000002"],
                   "img-00001.tar": ["000010000", "000010001", "000010002"],
                   "restart-a.tar": ["restart-a/s0", "restart-a/s1", "restart-a/s2"],
                   "restart-b.tar": ["restart-b/s0", "restart-b/s1", "restart-b/s2"]}

    shard("late.tar", ["000000001", "zz"])  # appended later, overlapping a planned shard that keeps its ids
    plan = load_or_create_plan(out, inputs, 100, {}, reader=reader, columns=reader.columns)
    late = str(tmp_path / "in" / "late.tar")
    assert [r["__key__"] for r in read_all(reader, late, plan.files[late])[0]] == ["late/000000001", "late/zz"]
    assert "prefix" not in plan.files[str(tmp_path / "in" / "img-00000.tar")]


def test_a_file_that_is_no_tar_is_left_out_of_the_plan_with_its_reason(tmp_path):
    write_shard(tmp_path / "in" / "a.tar", [("k.jpg", b"x")])
    (tmp_path / "in" / "b.tar").write_bytes(b"<html>503 Service Unavailable</html>" * 40)
    (tmp_path / "in" / "c.tar").write_bytes(b"")
    reader = WdsReader()
    plan = load_or_create_plan(LocalStore(tmp_path / "out"), [str(tmp_path / "in")], 100, {}, reader=reader)
    assert [u.file for u in plan.units] == [str(tmp_path / "in" / "a.tar")]
    assert sorted(plan.unreadable) == [str(tmp_path / "in" / "b.tar"), str(tmp_path / "in" / "c.tar")]
    assert "no valid tar header at byte 0" in plan.unreadable[str(tmp_path / "in" / "b.tar")]


def test_brace_patterns_list_every_shard_and_name_a_missing_one(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"shards-{i:05d}.tar", [("a.jpg", b"x")])
    (tmp_path / "shards-00000.parquet").write_bytes(b"a sidecar, not a shard")
    assert list_inputs([str(tmp_path / "shards-{00000..00002}.tar")], extensions=WdsReader.extensions) == [
        str(tmp_path / f"shards-{i:05d}.tar") for i in range(3)]
    assert list_inputs([str(tmp_path)], extensions=WdsReader.extensions) == [
        str(tmp_path / f"shards-{i:05d}.tar") for i in range(3)]
    with pytest.raises(PlanError, match=r"shards-00003.tar does not exist"):
        list_inputs([str(tmp_path / "shards-{00000..00003}.tar")], extensions=WdsReader.extensions)


def test_a_shard_or_sidecar_changed_after_planning_is_refused(tmp_path):
    shard = write_shard(tmp_path / "in" / "00000.tar", [("000.jpg", b"x"), ("001.jpg", b"y")])
    out, inputs, reader = LocalStore(tmp_path / "out"), [str(tmp_path / "in")], WdsReader()
    load_or_create_plan(out, inputs, 100, {}, reader=reader, columns=reader.columns)
    write_sidecar(shard, [{"key": "000", "status": "success"}, {"key": "001", "status": "success"}])
    with pytest.raises(PlanError, match=r"00000.tar changed after it was planned \(.*00000.parquet appeared beside it"):
        load_or_create_plan(out, inputs, 100, {}, reader=reader, columns=reader.columns)
    shard.with_suffix(".parquet").unlink()
    write_shard(shard, [("000.jpg", b"x"), ("001.jpg", b"y"), ("002.jpg", b"z")])
    with pytest.raises(PlanError, match=r"00000.tar changed after it was planned \(its last 64 KiB differ\)"):
        load_or_create_plan(out, inputs, 100, {}, reader=reader, columns=reader.columns)


def test_config_takes_the_format_from_the_extension_and_checks_webdataset_keys(tmp_path):
    base = {"model": {"path": "/m"}, "task": {"prompt": "Is it {caption}?"}, "output": {"path": str(tmp_path / "o")}}

    def cfg(**inp):
        return config_from_dict(base | {"input": {"columns": ["caption"]} | inp})

    c = cfg(paths=["s3://b/shards-{00000..00009}.tar"])
    assert (c.input.format, c.input.id_column, c.input.image_extensions) == ("webdataset", "__key__",
                                                                             ["jpg", "jpeg", "png", "webp"])
    assert cfg(paths=["/d/*.parquet"]).input.format == "parquet" and cfg(paths=["/d"]).input.id_column == "id"
    assert cfg(paths=["/d"], format="webdataset", image_extensions=[".JPG"]).input.image_extensions == ["jpg"]
    for inp, msg in [({"paths": ["/a.tar", "/b.parquet"]}, "input.paths: mixes .tar shards and other inputs"),
                     ({"paths": ["/a.tar"], "id_column": "key"}, "input.id_column: a WebDataset sample's id is its "
                                                                 "__key__"),
                     ({"paths": ["/a.parquet"], "skip_failed": True}, "input.skip_failed: applies to webdataset "
                                                                     "inputs only"),
                     ({"paths": ["/a.tar"], "format": "csv"}, "input.format: must be 'parquet' or 'webdataset'")]:
        with pytest.raises(ConfigError) as e:
            cfg(**inp)
        assert str(e.value).startswith(msg), str(e.value)


# --- end to end -------------------------------------------------------------------------------------

PROMPT = "Does this image show {caption}? Answer yes or no."


def write_config(path: Path, model: Path, inputs: list, out: Path, **run) -> Path:
    doc = {"model": {"path": str(model), "dtype": "float32", "device": "cpu"},
           "input": {"paths": [str(p) for p in inputs], "columns": ["caption", "txt"]},
           "task": {"prompt": PROMPT},
           "output": {"path": str(out)},
           "run": {"batch_tokens": 2048, "workers": 0, "log_every_s": 1} | run}
    path.write_text(json.dumps(doc, indent=2))
    return path


def build_shards(root: Path, seed: int = 0) -> dict[str, dict]:
    """Three shards: an img2dataset one (sidecar, a failed download, truncated), one with every kind of odd sample,
    one truncated without a sidecar. Returns id -> {"kind": the expected error kind or None, "image", "caption"}."""
    rng = random.Random(seed)
    want = {}

    def sample(key: str, kind=None, image=None, caption=None, prefix=""):
        image = picture(rng, "JPEG") if image is None else image
        caption = caption or rng.choice(["a cat", "a dog", "a red car", "a tree"])
        want[prefix + key] = {"kind": kind, "image": image, "caption": caption}
        return [(f"{key}.jpg", image), (f"{key}.json", member_json(caption=caption))]

    # img2dataset: keys unique across shards, a sidecar; 000000003 failed to download; the tar loses its end
    members, side = [], []
    for i in range(12):
        key = f"{i:09d}"
        side.append({"key": key, "status": "failed_to_download" if i == 3 else "success",
                     "error_message": "HTTP 404" if i == 3 else None, "caption": "a cat"})
        if i == 3:
            want[key] = {"kind": "download"}
        elif i >= 10:
            want[key] = {"kind": "missing"}  # cut off below
        else:
            members += sample(key)
    data = write_shard(root / "data" / "00000.tar", members + [("000000010.jpg", b"x" * 5000)]).read_bytes()
    (root / "data" / "00000.tar").write_bytes(data[: data.find(b"000000010.jpg") + 512 + 1000])
    write_sidecar(root / "data" / "00000.tar", side)

    # odd samples, keys that restart in every shard ("s..."): the shard name goes before them
    jpeg = picture(rng, "JPEG")
    members = sample("s00", prefix="odd/") + sample("s01", prefix="odd/")
    members += [(f"photo.v2.final.{e}", d) for e, d in sample("photo", prefix="odd/")]  # several dots: key "photo"
    members += [("s02.json", member_json(caption="no image")), ("s02.txt", b"words")]
    want["odd/s02"] = {"kind": "missing"}
    members += [("s03.jpg", jpeg[: len(jpeg) // 2]), ("s03.json", member_json(caption="half"))]
    want["odd/s03"] = {"kind": "truncated"}  # a corrupt image member
    members += [("s04.jpg", picture(rng, "PNG")), ("s04.json", b"{broken")]
    want["odd/s04"] = {"kind": "corrupt"}
    members += sample("s05", prefix="odd/") + sample("s06", prefix="odd/") + [("s05.txt", b"late")]
    want["odd/s05"]["kind"] = "split_key"
    for i in range(10, 270):  # past a batch of rows: s00's row is handed on before its key comes again
        members += sample(f"s{i:02d}", prefix="odd/")
    members += sample("s00", prefix="x/")[:1]
    want.pop("x/s00")
    want["odd/s00"]["kind"] = "duplicate_key"
    write_shard(root / "data" / "odd.tar", members)

    # no sidecar, cut inside a member: the rows before the break stay
    members = []
    for i in range(6):
        members += sample(f"s{i:02d}", prefix="cut/")
    cut = write_shard(root / "data" / "cut.tar", members)
    data = cut.read_bytes()
    last = data.rfind(b"s05.jpg")
    cut.write_bytes(data[: last + 512 + 300])
    want.pop("cut/s05")
    return want


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return root, build_shards(root)


@pytest.mark.slow
def test_run_over_webdataset_shards_scores_each_key_once_and_records_every_problem(shards, tiny_qwen3_vl, tmp_path):
    root, want = shards
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "config.yaml", tiny_qwen3_vl, [root / "data" / "*.tar"], out, workers=1)
    code, err = run(cfg)
    assert code == 0, err
    table = ds.dataset(str(out), format="parquet").to_table()
    assert table.column_names == ["__key__", "caption", "txt", "yes_logit", "no_logit", "p_yes", "error"]
    got = {r["__key__"]: r for r in table.to_pylist()}
    assert len(got) == table.num_rows and sorted(got) == sorted(want), "a key is missing or twice"
    for key, w in want.items():
        kind = got[key]["error"] and got[key]["error"].split(":")[0]
        assert kind == w["kind"], (key, got[key]["error"])
    assert got["odd/s02"]["txt"] == "words"
    assert got["000000003"]["caption"] == "a cat"  # from the sidecar: the tar has no sample of it

    good = [k for k, w in want.items() if w["kind"] is None]
    spec = open_spec(load_config(cfg), "cpu", "float32", workers=0)
    samples = [spec.prep((want[k]["image"], {"__key__": k, "caption": want[k]["caption"], "txt": None})) for k in good]
    ref = spec.load_engine().score(samples)[:, 0]
    np.testing.assert_allclose([got[k]["yes_logit"] for k in good], ref[:, 0], rtol=0, atol=1e-5)
    np.testing.assert_allclose([got[k]["no_logit"] for k in good], ref[:, 1], rtol=0, atol=1e-5)

    units = plan_units(out)
    assert summary(err) == (len(want), len(units)) and len(units) == 3
    notes = {m["unit"]: m.get("notes", {}) for m in markers(out).values()}
    assert sum(m["errors"] for m in markers(out).values()) == sum(w["kind"] is not None for w in want.values())
    sidecar, cut, odd = (notes[u] for u in sorted(units))  # files in path order: 00000, cut, odd
    assert "truncated" in sidecar and sidecar["missing_keys"].startswith("2 listed keys are not in the tar")
    assert cut["truncated"].startswith("it ends at byte ") and cut["truncated"].endswith("inside member s05.jpg")
    assert odd == {"repeated_keys": 2}


def tar_variants() -> dict[str, bytes]:
    """Tars as tarfile writes them in each format, with what a corpus may hold besides plain files."""
    out = {}
    long = "deep/" * 25 + "name.with.dots.jpg"  # over 100 bytes: GNU long name, pax path or ustar prefix
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data, kind in [("a.jpg", b"x" * 1000, tarfile.REGTYPE), ("dir", b"", tarfile.DIRTYPE),
                                     (long, b"y" * 512, tarfile.REGTYPE), ("link.jpg", b"", tarfile.SYMTYPE),
                                     ("__meta__", b"m", tarfile.REGTYPE), ("empty.txt", b"", tarfile.REGTYPE),
                                     ("ünï.json", b"{}", tarfile.REGTYPE)]:
                if fmt == tarfile.USTAR_FORMAT and name == "ünï.json":
                    continue
                info = tarfile.TarInfo(name)
                info.type, info.size, info.linkname = kind, len(data), "a.jpg" if kind == tarfile.SYMTYPE else ""
                tar.addfile(info, io.BytesIO(data) if data else None)
        out[fmt] = buf.getvalue()
    return out


def test_the_tar_walk_yields_what_webdatasets_iteration_yields_and_stops_where_it_stops():
    from webdataset.tariterators import tar_file_iterator

    from po_batch.data.readers.tar import TarCut, members

    def walk(data: bytes):
        got = []
        try:
            for name, body in members(io.BytesIO(data)):
                got.append((name, body))
        except TarCut:
            pass
        return got

    def theirs(data: bytes):
        got = []
        try:
            for m in tar_file_iterator(io.BytesIO(data), skip_meta=None):
                got.append((m["fname"], m["data"]))
        except tarfile.TarError:
            pass
        return [g for g in got if not (g[0].startswith("__") and g[0].endswith("__"))]  # it skips those itself

    for fmt, data in tar_variants().items():
        ours = [g for g in walk(data) if not (g[0].startswith("__") and g[0].endswith("__"))]
        assert ours == theirs(data) and len(ours) >= 3, fmt
        for cut in range(0, len(data), 97):
            assert [g for g in walk(data[:cut]) if g[0] != "__meta__"] == theirs(data[:cut]), (fmt, cut)
        headers = [(n, b"") for n, _ in ours]
        seek = [(n, b) for n, b in members(io.BytesIO(data), len(data)) if n != "__meta__"]
        assert seek == headers, fmt
