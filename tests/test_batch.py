"""The batch description's shared prefix: the rows every sample of a batch begins with run once, each sample's first
segment attending to them; the same scores as without (float32, CPU), fewer tokens, and key ranges that say what
the gathered keys say."""

import numpy as np
import pytest
import torch

from po_batch.config import config_from_dict
from po_batch.engine import batch as batch_mod
from po_batch.engine.batch import make_batch, pack, shared_prefix
from po_batch.layers import attention
from po_batch.sample import Sample
from po_batch.spec import open_spec
from po_batch.tiny import build_checkpoint

WORDS = "the a photo of red blue green dog cat car tree house boat person building".split()


def sample(ids, segments=None) -> Sample:
    ids = np.array(ids, dtype=np.int32)
    seg = np.array(segments or [[len(ids), -1, 1]], dtype=np.int32)
    return Sample(input_ids=ids, positions=np.arange(len(ids), dtype=np.int32)[None], segments=seg,
                  targets=np.full(int(seg[:, 2].sum()), -1, dtype=np.int32))


def test_the_common_prefix_stops_at_the_first_difference_an_image_token_and_the_rows_read():
    common = list(range(100, 120))
    a, b = sample(common + [1, 2, 3]), sample(common + [1, 5, 6, 7])
    assert shared_prefix([a, b], None) == 21
    assert shared_prefix([a], None) == 0  # one sample: nothing to share
    assert shared_prefix([a, b], 110) == 10  # an image's tokens take features of their own sample
    assert shared_prefix([a, sample(common[:5] + [9] * 20)], None) == 0  # fewer than SHARE_PREFIX rows in common
    reads = sample(common + [1, 2, 3], [[23, -1, 3]])  # its last 3 rows are read: they stay its own
    assert shared_prefix([reads, b], None) == 20
    moved = sample(common + [1, 2, 3])
    moved.positions = moved.positions + 1  # the same tokens at other positions are other rows
    assert shared_prefix([a, moved], None) == 0
    both = sample(common + [1, 2, 3])
    assert shared_prefix([a, both], None) == 22  # identical: all but the row read
    # packing counts the shared rows once per batch: 3 samples of 23 tokens sharing 20 fit in 23 + 3 + 3
    assert pack([a, both, both], 29, 20) == [[0, 1, 2]] and pack([a, both, both], 28, 20) == [[0, 1], [2]]


def key_sets(meta):
    """Each sequence's key rows as the gather lists them and as its ranges do."""
    cu, rows, ranges = meta.cu_k.tolist(), meta.key_rows.tolist(), meta.ranges.tolist()
    gathered = [rows[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
    ranged = [list(range(p0, p1)) + list(range(k0, k1)) for k0, k1, p0, p1 in ranges]
    return gathered, ranged


def test_the_key_ranges_list_the_same_keys_as_the_gather(monkeypatch):
    monkeypatch.setattr(attention, "PREFIX_IN_PLACE", True)  # the batch carries the ranges for the kernel
    common = list(range(100, 130))
    samples = [sample(common + list(range(n))) for n in (3, 7, 1, 12)]
    b = make_batch(samples, None, torch.device("cpu"))
    assert len(b.input_ids) == 30 + 3 + 7 + 1 + 12  # one copy of the prefix
    for meta in (b.context.text, b.context.reads):
        gathered, ranged = key_sets(meta)
        assert gathered == ranged
    # a sample with two questions under its own prefix: after the batch's prefix, its questions' ancestors are
    # one run of rows; after another sample, two (the batch's prefix and its own), so the keys are gathered
    tree = sample(common + [1, 2] + [3, 4] + [5, 6], [[32, -1, 0], [2, 0, 1], [2, 0, 1]])
    first = make_batch([tree, samples[0]], None, torch.device("cpu")).context.text
    assert first.ranges is not None and key_sets(first)[0] == key_sets(first)[1]
    second = make_batch([samples[0], tree], None, torch.device("cpu")).context.text
    assert second.ranges is None and second.key_rows is not None


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    cfg = config_from_dict({
        "model": {"path": str(ckpt)}, "output": {"path": "/tmp/unused"},
        "input": {"paths": ["/tmp/unused.parquet"], "image_column": None, "columns": ["query", "doc"]},
        "task": {"type": "rerank", "query": "{query}", "document": "{doc}"}, "run": {"batch_tokens": 4096}})
    spec = open_spec(cfg, "cpu", "float32", workers=0)
    rng = np.random.default_rng(0)
    rows = [(None, {"id": i, "query": " ".join(rng.choice(WORDS, 4)),
                    "doc": " ".join(rng.choice(WORDS, int(rng.integers(5, 30))))}) for i in range(12)]
    prep = spec.prep
    return spec.load_engine(), [prep(r) for r in rows]


def test_a_reranker_s_judge_prompt_runs_once_a_batch_with_the_same_scores(reranker, monkeypatch):
    engine, samples = reranker
    shared = shared_prefix(samples, None)
    assert shared > 20  # the judge's system prompt and the instruction
    batch = make_batch(samples, None, torch.device("cpu"))
    assert len(batch.input_ids) == sum(s.tokens for s in samples) - (len(samples) - 1) * shared
    got = engine.score(samples)
    monkeypatch.setattr(batch_mod, "SHARE_PREFIX", 0)
    assert shared_prefix(samples, None) == 0
    want = engine.score(samples)
    assert np.abs(got - want).max() <= 1e-5
    alone = np.concatenate([engine.score([s]) for s in samples])
    assert np.abs(alone - want).max() <= 1e-5


def test_a_run_counts_the_shared_rows_once_in_its_token_budget(tmp_path, monkeypatch):
    """`po-batch run` fills each forward by the tokens it runs: more reranker pairs a batch than their full lengths
    allow, one packed forward each, and the same scores as a run that shares nothing."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from po_batch import worker
    from po_batch.engine.runner import Engine

    ckpt = build_checkpoint(tmp_path / "ckpt", "qwen3")
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(24)],
                             "query": [" ".join(rng.choice(WORDS, 3)) for _ in range(24)],
                             "doc": [" ".join(rng.choice(WORDS, int(rng.integers(2, 12)))) for _ in range(24)]}),
                   tmp_path / "data.parquet")
    launches = []
    launch = Engine.launch

    def spy(self, samples, shared=None):
        assert shared == shared_prefix(samples, self.image_token_id)  # the run found what the engine would
        launches.append((sum(s.tokens for s in samples), len(samples), shared,
                         len(pack(samples, self.batch_tokens, shared))))
        return launch(self, samples, shared)

    monkeypatch.setattr(Engine, "launch", spy)

    def run(out):
        cfg = config_from_dict({
            "model": {"path": str(ckpt), "device": "cpu"}, "output": {"path": str(tmp_path / out)},
            "input": {"paths": [str(tmp_path / "data.parquet")], "image_column": None, "columns": ["query", "doc"]},
            "task": {"type": "rerank", "query": "{query}", "document": "{doc}"},
            "run": {"workers": 0, "rows_per_unit": 24, "batch_tokens": 512}})
        assert worker.run(cfg) == 0
        return np.array(ds.dataset(cfg.output.path).to_table().sort_by("id")["score"].to_pylist())

    shared_run = run("shared")
    assert all(groups == 1 and tokens - (n - 1) * shared <= 512 for tokens, n, shared, groups in launches)
    assert max(tokens for tokens, *_ in launches) > 512 and all(shared > 20 for *_, shared, _ in launches)
    batches = len(launches)
    monkeypatch.setattr(batch_mod, "SHARE_PREFIX", 0)
    launches.clear()
    assert np.abs(run("full") - shared_run).max() <= 1e-5
    assert all(tokens <= 512 for tokens, *_ in launches) and len(launches) > 2 * batches
