"""topk and nearest over outputs split into many parts (with failed rows, ties, null groups), against a full sort
and a brute-force cosine search of everything at once; and the commands' errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from po_batch.retrieve import RetrieveError, nearest, topk


def write_parts(root, columns: dict, parts: int, seed: int = 0) -> list[dict]:
    """The rows split at random places into `parts` part files (some empty), as `po-batch run` commits them; a
    temporary file and the state folder beside them, which readers must skip."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    cuts = np.sort(np.random.default_rng(seed).integers(0, table.num_rows + 1, parts - 1))
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, table.num_rows])):
        pq.write_table(table.slice(a, b - a), root / f"part-{i:05d}.parquet")
    pq.write_table(table.slice(0, 3), root / ".part-00000.123.tmp")
    (root / "_po_batch").mkdir()
    (root / "_po_batch" / "plan.json").write_text("{}")
    return table.to_pylist()


def full_sort(rows: list[dict], by: str, group: str | None, k: int, ascending: bool) -> list[dict]:
    """Every row at once: sorted by group, then score (ties: the earlier row), the first k of each group."""
    scored = [(r.get(group) if group else None, r[by] if ascending else -r[by], i, r)
              for i, r in enumerate(rows) if r[by] is not None]
    scored.sort(key=lambda t: ((t[0] is None, t[0] or ""), t[1], t[2]))
    out, counts = [], {}
    for g, _, _, r in scored:
        counts[g] = counts.get(g, 0) + 1
        if counts[g] <= k:
            out.append(r | {"rank": counts[g]})
    return out


@pytest.mark.parametrize("group,ascending", [("query", False), (None, False), ("query", True)])
def test_topk_over_many_parts_equals_a_full_sort(tmp_path, group, ascending):
    rng = np.random.default_rng(1)
    n = 997
    score = rng.integers(0, 40, n).astype(np.float32) / 8  # many ties
    failed = rng.random(n) < 0.1
    queries = rng.choice(["cat", "dog", "car", "tree", None], n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    rows = write_parts(tmp_path / "out", {
        "id": [f"r{i}" for i in range(n)], "query": queries.tolist(),
        "score": pa.array(np.where(failed, np.nan, score), mask=failed),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 4).astype(np.float16)), 4),
        "error": [("prep: bad" if f else None) for f in failed]}, parts=23)
    for batch_rows in (64, 1_000_000):  # merged across many batches, or a batch per part
        out = tmp_path / f"top-{batch_rows}.parquet"
        written = topk(str(tmp_path / "out"), "score", 5, str(out), group, ascending, batch_rows=batch_rows)
        got = pq.read_table(out).to_pylist()
        want = full_sort(rows, "score", group, 5, ascending)
        assert written == len(got) == len(want) == (5 * 5 if group else 5)
        assert [(r["id"], r["rank"]) for r in got] == [(r["id"], r["rank"]) for r in want]
        assert got == want  # every column comes along, embeddings included
    assert pq.read_table(out).schema.field("embedding").type == pa.list_(pa.float16(), 4)


def brute_force(images: np.ndarray, queries: np.ndarray, valid: np.ndarray, k: int):
    """Cosine of every query against every image row at once, in float64, best first, ties to the earlier row."""
    a = images / np.linalg.norm(images, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = np.where(valid[None], q @ a.T, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :min(k, valid.sum())]
    return order, np.take_along_axis(sims, order, 1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_nearest_streamed_in_chunks_equals_brute_force(tmp_path, dtype):
    rng = np.random.default_rng(2)
    n, d, nq, k = 613, 24, 37, 7
    images = rng.normal(size=(n, d)).astype(dtype)
    images[100] = images[7]  # exact ties: the earlier row wins
    images[400] = images[7] * 3  # the same direction, another norm
    valid = rng.random(n) > 0.08
    queries = rng.normal(size=(nq, d)).astype(dtype)
    queries[0] = images[7]
    emb = lambda x, mask=None: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d,  # noqa: E731
                                                                 mask=None if mask is None else pa.array(mask))
    write_parts(tmp_path / "images", {"id": [f"img{i}" for i in range(n)], "embedding": emb(images, ~valid)}, 17)
    write_parts(tmp_path / "queries", {"qid": list(range(nq)), "embedding": emb(queries)}, 5, seed=3)
    out = tmp_path / "near.parquet"
    written = nearest(str(tmp_path / "images"), str(tmp_path / "queries"), k, str(out), id_column="id",
                      query_id_column="qid", chunk_rows=50, query_rows=16, device="cpu")
    got = pq.read_table(out)
    assert written == got.num_rows == nq * k
    assert got.column_names == ["query_qid", "rank", "id", "score"]
    order, sims = brute_force(images.astype(np.float64), queries.astype(np.float64), valid, k)
    assert got.column("query_qid").to_pylist() == np.repeat(np.arange(nq), k).tolist()
    assert got.column("rank").to_pylist() == np.tile(np.arange(1, k + 1), nq).tolist()
    assert got.column("id").to_pylist() == [f"img{i}" for i in order.reshape(-1)]
    assert np.abs(got.column("score").to_numpy() - sims.reshape(-1)).max() < 1e-5
    first = got.slice(0, 3).column("id").to_pylist()
    assert first == ["img7", "img100", "img400"]  # the query is image 7: its copies tie, in row order


def test_topk_and_nearest_errors_name_the_column(tmp_path, po_batch_cli):
    write_parts(tmp_path / "out", {"id": ["a", "b"], "score": [1.0, 2.0], "label": ["x", "y"]}, 2)
    with pytest.raises(RetrieveError, match=r"no column 'nope' \(it has: id, score, label\)"):
        topk(str(tmp_path / "out"), "nope", 3, str(tmp_path / "t.parquet"))
    with pytest.raises(RetrieveError, match=r"--by: 'label' is not a number column"):
        topk(str(tmp_path / "out"), "label", 3, str(tmp_path / "t.parquet"))
    with pytest.raises(RetrieveError, match=r"column 'score' is not an embedding"):
        nearest(str(tmp_path / "out"), str(tmp_path / "out"), 3, str(tmp_path / "n.parquet"), column="score")
    with pytest.raises(RetrieveError, match=r"missing: no such output directory"):
        topk(str(tmp_path / "missing"), "score", 3, str(tmp_path / "t.parquet"))
    r = po_batch_cli("topk", tmp_path / "out", "--by", "score", "--k", "1", "--out", tmp_path / "t.parquet")
    assert r.returncode == 0 and pq.read_table(tmp_path / "t.parquet").column("id").to_pylist() == ["b"]
    r = po_batch_cli("nearest", tmp_path / "out", tmp_path / "out", "--column", "score", "--out", tmp_path / "n.pq")
    assert r.returncode == 2 and "column 'score' is not an embedding" in r.stderr
