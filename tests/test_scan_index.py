"""The skip index of ``moderate`` at scale: its hash, its exact lookup, its generations and
partitions, and the index actors that hold it for a scan; each against the simple reading of
every run (pyarrow's join over all keys)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from ntf_ray import storage
from ntf_ray.scan import index, keyhash, publish, table
from ntf_ray.scan.index import KEY, KEY_SCHEMA

OPTS = storage.StorageOptions()


KEY_16 = "0123456789abcdef"
_MASK = (1 << 64) - 1


def _siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 as its paper writes it (Aumasson and Bernstein, 2012), one message at a time."""
    def rotl(x, b):
        return ((x << b) | (x >> (64 - b))) & _MASK

    def rounds(v, n):
        v0, v1, v2, v3 = v
        for _ in range(n):
            v0 = (v0 + v1) & _MASK; v1 = rotl(v1, 13); v1 ^= v0; v0 = rotl(v0, 32)  # noqa: E702
            v2 = (v2 + v3) & _MASK; v3 = rotl(v3, 16); v3 ^= v2  # noqa: E702
            v0 = (v0 + v3) & _MASK; v3 = rotl(v3, 21); v3 ^= v0  # noqa: E702
            v2 = (v2 + v1) & _MASK; v1 = rotl(v1, 17); v1 ^= v2; v2 = rotl(v2, 32)  # noqa: E702
        return [v0, v1, v2, v3]

    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]
    tail = len(data) % 8
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - tail, 8)]
    words.append(int.from_bytes(data[len(data) - tail:], "little") | (len(data) & 0xFF) << 56)
    for m in words:
        v[3] ^= m
        v = rounds(v, 2)
        v[0] ^= m
    v[2] ^= 0xFF
    v = rounds(v, 4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _reference_hash(text: str | None, key: str = KEY_16) -> int:
    """``keyhash.string_hash`` written out one string at a time: SipHash-2-4, then splitmix64's finaliser."""
    x = _siphash24(key.encode(), (text or "").encode())
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & _MASK
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def test_the_reference_siphash_is_the_papers():
    # the paper's test vector: key 00..0f, message 00..0e
    assert _siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5


def test_the_hash_is_the_written_out_one_on_awkward_strings_slices_and_chunks():
    rng = random.Random(3)
    words = ["", None, "a", "é", "名前", "\u202etxt.exe", "x" * 700, "s3://b/k/" + "z" * 40, "\x00"]
    words += ["".join(rng.choice("ab/é.名\x00") for _ in range(rng.randrange(0, 30))) for _ in range(300)]
    expected = np.array([_reference_hash(w) for w in words], np.uint64)
    arr = pa.array(words, pa.string())
    assert np.array_equal(keyhash.string_hash(arr, KEY_16), expected)
    assert np.array_equal(keyhash.string_hash(arr, KEY_16, slice_rows=7), expected)  # slices of the work
    assert np.array_equal(keyhash.string_hash(arr.slice(5, 100), KEY_16), expected[5:105])  # an offset array
    chunked = pa.chunked_array([arr.slice(0, 50), arr.slice(50)])
    assert np.array_equal(keyhash.string_hash(chunked, KEY_16), expected)
    assert np.array_equal(keyhash.string_hash(arr.cast(pa.large_string()), KEY_16), expected)
    assert keyhash.string_hash(pa.array([], pa.string()), KEY_16).shape == (0,)
    other = keyhash.string_hash(arr, "fedcba9876543210")  # another index's key: other hashes
    assert np.array_equal(other, np.array([_reference_hash(w, "fedcba9876543210") for w in words], np.uint64))
    assert (other != expected).mean() > 0.99
    parts = keyhash.partition_of(arr, 7, KEY_16)
    assert parts.min() >= 0 and parts.max() < 7 and len(set(parts.tolist())) == 7
    assert np.array_equal(parts, keyhash.partition_of_hash(expected, 7))
    with pytest.raises(ValueError):
        keyhash.string_hash(arr, "short")


def test_an_index_whose_hash_check_fails_is_read_as_an_earlier_layout(tmp_path):
    _run(tmp_path, "r1", ["a", "b"])
    _fold(tmp_path, "r1")
    assert index.plan(str(tmp_path), "m1", OPTS).indexed == {"r1": index.plan(str(tmp_path), "m1", OPTS).runs["r1"]}
    path = index.index_path(str(tmp_path), "m1")
    state = json.loads(storage.read_bytes(path))
    for broken in ({"hash_check": "0" * 16}, {"hash_key": "short"}, {"hash_key": None}):
        storage.write_bytes(path, json.dumps({**state, **broken}).encode())
        found = index.plan(str(tmp_path), "m1", OPTS)
        assert found.indexed == {} and found.fresh  # every run is read again, under a new key
        assert found.hash_key != state["hash_key"]
        seen = index.history(str(tmp_path), "m1", OPTS).seen
        assert sorted(seen.column("uri").to_pylist()) == ["a", "b"]


def _keys(n: int, seed: int, etags: int = 3) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "uri": [f"s3://b/{rng.integers(0, n * 2)}.png" for _ in range(n)],
        "etag": [f"e{rng.integers(0, etags)}" for _ in range(n)],
        "modified": rng.integers(-1, 3, n),
    }, schema=KEY_SCHEMA)


def _reference_seen(seen: pa.Table, keys: pa.Table) -> np.ndarray:
    """What the scan's check did before the index was partitioned: pyarrow's join on ``KEY``
    (a null uri or etag matches nothing)."""
    marked = keys.append_column("_row", pa.array(range(keys.num_rows), pa.int64()))
    hit = marked.join(seen, keys=KEY, join_type="left semi").column("_row").to_numpy()
    out = np.zeros(keys.num_rows, np.bool_)
    out[hit] = True
    return out


def _shard_of(seen: pa.Table) -> index.Shard:
    shard = index.Shard.__new__(index.Shard)
    shard.plan = index.Plan(root="", hash_key=KEY_16, partitions=1, generations=[], losses_file=None, indexed={},
                            runs={})
    shard._index(shard._with_fp(seen))
    return shard


@pytest.mark.parametrize("collide", [False, True])
def test_the_lookup_finds_exactly_the_keys_held_even_when_fingerprints_collide(collide, monkeypatch):
    if collide:  # 3 fingerprints for thousands of keys: every match must be checked against the key
        real = index.fingerprint
        monkeypatch.setattr(index, "fingerprint", lambda keys, key, **kw: real(keys, key, **kw) % np.uint64(3))
    seen = _keys(3000, seed=1).group_by(KEY).aggregate([]).select(KEY)
    asked = pa.concat_tables([_keys(2000, seed=2), seen.slice(0, 500)])
    nulls = pa.table({"uri": ["s3://b/1.png", None], "etag": [None, "e1"], "modified": [0, 0]}, schema=KEY_SCHEMA)
    asked = pa.concat_tables([asked, nulls])
    got = _shard_of(seen).seen_mask(asked)
    want = _reference_seen(seen, asked)
    assert want.sum() >= 500 and np.array_equal(got, want)
    assert not got[-2:].any()  # a null etag or uri is never "already scored"
    assert not _shard_of(KEY_SCHEMA.empty_table()).seen_mask(asked).any()
    # keys held twice (two generations), between others of the same fingerprint: each held once
    twice = _shard_of(pa.concat_tables([seen, seen.slice(0, 700), seen.slice(300, 900)]))
    assert sorted(twice.keys().to_pylist(), key=str) == sorted(seen.to_pylist(), key=str)
    assert twice.keys().to_pylist()[:50] == seen.slice(0, 50).to_pylist()  # in the order first read
    assert np.array_equal(twice.seen_mask(asked), want)
    # held in many chunks (an index of many files): looked up chunk by chunk, the same answer
    chunked = _shard_of(pa.concat_tables([seen.slice(i, 431) for i in range(0, seen.num_rows, 431)]))
    assert len(chunked._batches) > 5 and np.array_equal(chunked.seen_mask(asked), want)


def _run(out, run_id: str, uris: list[str], errors: list[str | None] | None = None) -> None:
    """Publish a run of model m1 with one row per uri (as ``test_scan_table`` does)."""
    n = len(uris)
    cols = {f.name: pa.nulls(n, f.type) for f in publish.STAGED_SCHEMA}
    cols.update(uri=pa.array(uris, pa.string()), etag=pa.array([f"e-{u}" for u in uris], pa.string()),
                error=pa.array(errors or [None] * n, pa.string()), model_id=pa.array(["m1"] * n, pa.string()),
                seq=pa.array(range(n), pa.int64()))
    staged = publish.staging_dir(str(out), run_id)
    sink = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols, schema=publish.STAGED_SCHEMA), sink)
    storage.write_bytes(f"{staged}/part-0.parquet", sink.getvalue().to_pybytes())
    listing = pa.table({"uri": uris, "etag": [f"e-{u}" for u in uris], "size_bytes": pa.array([1] * n, pa.int64()),
                        "last_modified": pa.nulls(n, pa.timestamp("us", tz="UTC")), "seq": pa.array(range(n), pa.int64())})
    publish.publish(staged, f"{out}/dt=2026-01-01/run_id={run_id}", lambda: [listing], n, "worker_lost: test",
                    run_id=run_id, model_id="m1", threshold=0.5, options=OPTS)


def _fold(out, run_id: str, shards: int = 1) -> None:
    """What a scan does once ``run_id`` is published: every shard writes its part of the next
    generation, then ``index.json`` (``ray_edge.scan.skip.SkipIndex.commit``, without Ray)."""
    found = index.plan(str(out), "m1", OPTS, exclude_run=run_id)  # as planned before the run published
    run = table.runs_by_id(str(out), OPTS)[run_id]
    folder, runs = run.folder, {**found.runs, run_id: run.version or ""}
    holders = [index.Shard(found, parts, "m1", OPTS) for parts in found.shards(rows_per_shard=max(1, -(-found.rows // shards)))]
    partitions = index.compaction(found, 10)
    name = index.new_generation_name(run_id)
    written = [h.write_generation(name, [folder], compact=partitions is not None,
                                  partitions=partitions or found.partitions, shard=i) for i, h in enumerate(holders)]
    losses = index.sum_losses([index.read_losses(found, OPTS), *(h.fresh_losses for h in holders),
                               *(lost for _, _, lost in written)])
    for h in holders:
        losses = h.not_final(losses)
    index.commit(found, {"name": name, "files": sorted(f for fs, _, _ in written for f in fs),
                         "rows": sum(n for _, n, _ in written)}, losses, runs, OPTS,
                 partitions=partitions or found.partitions, replaces=partitions is not None)


def test_generations_partitions_and_compaction_hold_what_reading_every_run_gives(tmp_path, monkeypatch):
    from ntf_ray.errors import POISON_AFTER, lost_error

    monkeypatch.setattr(index, "PARTITION_ROWS", 4)  # a few keys per partition: several partitions soon
    monkeypatch.setattr(index, "MAX_GENERATIONS", 3)
    seen_generations = []
    for i in range(7):
        uris = [f"u{i}-{j}" for j in range(6)] + ["again", "lost"]
        _run(tmp_path, f"r{i}", uris, [None] * 6 + [None, lost_error(1, i + 1)])
        _fold(tmp_path, f"r{i}", shards=2)
        state = index._read_plan(str(tmp_path), "m1", OPTS)
        seen_generations.append(len(state.generations))
        indexed = index.history(str(tmp_path), "m1", OPTS)
        assert indexed.runs == state.indexed  # nothing left unread
        (tmp_path / table.INDEX).rename(tmp_path / "_moved")
        full = index.history(str(tmp_path), "m1", OPTS)
        (tmp_path / "_moved").rename(tmp_path / table.INDEX)
        assert sorted(indexed.seen.to_pylist(), key=str) == sorted(full.seen.to_pylist(), key=str)
        assert indexed.losses.to_pylist() == full.losses.to_pylist()
        if i + 1 < POISON_AFTER:  # summed over runs, never counted twice
            assert [(r["uri"], r["losses"]) for r in indexed.losses.to_pylist()] == [("lost", i + 1)]
        else:  # poison now: final, no longer a loss
            assert indexed.losses.num_rows == 0 and "lost" in indexed.seen.column("uri").to_pylist()
    state = index._read_plan(str(tmp_path), "m1", OPTS)
    assert state.partitions > 1 and max(seen_generations) <= 3 and 1 in seen_generations[1:]  # compacted
    named = {f for g in state.generations for f in g["files"]}
    on_disk = {str(p.relative_to(tmp_path / table.INDEX / "model_id=m1")) for p in
               (tmp_path / table.INDEX / "model_id=m1").rglob("p=*/*.parquet")}
    assert named == on_disk  # compacted generations are gone


def test_a_generation_index_json_does_not_name_is_not_part_of_the_index(tmp_path):
    _run(tmp_path, "r1", ["a"])
    _fold(tmp_path, "r1")
    root = tmp_path / table.INDEX / "model_id=m1"
    # a run that died after writing its part, before index.json: its keys must not count
    sink = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": ["ghost"], "etag": ["e-ghost"], "modified": [-1]}, schema=KEY_SCHEMA), sink)
    (root / "p=000" / "dead-0.parquet").write_bytes(sink.getvalue().to_pybytes())
    assert index.history(str(tmp_path), "m1", OPTS).seen.column("uri").to_pylist() == ["a"]


@pytest.mark.timeout(300)
def test_the_index_actors_answer_as_the_simple_check_and_fold_a_run_in(local_ray, tmp_path, monkeypatch):
    """Several index actors (a few keys each): the keys they call seen, the losses and the index
    they leave are those of reading every run in one process."""
    from ntf_ray.errors import lost_error
    from ntf_ray.ray_edge.scan.skip import SkipIndex

    monkeypatch.setattr(index, "PARTITION_ROWS", 5)
    monkeypatch.setattr(index, "SHARD_ROWS", 12)
    for i in range(3):
        _run(tmp_path, f"r{i}", [f"u{i}-{j}" for j in range(20)] + ["k"], [None] * 20 + [lost_error(1, 1)])
    found = index.history(str(tmp_path), "m1", OPTS)
    index.write_index(str(tmp_path), "m1", found.seen, found.runs, OPTS, losses=found.losses)
    _run(tmp_path, "r3", ["fresh-1", "fresh-2", "u0-1"])  # published since the index was written
    reference = index.history(str(tmp_path), "m1", OPTS, exclude_run="r4")
    asked = pa.table({"uri": [f"u{i}-{j}" for i in range(4) for j in range(0, 25, 3)] + ["fresh-2", "k", "new"],
                      "etag": [f"e-u{i}-{j}" for i in range(4) for j in range(0, 25, 3)] + ["e-fresh-2", "e-k", "e-n"],
                      "modified": [-1] * 39}, schema=KEY_SCHEMA)
    asked = pa.concat_tables([asked, asked.set_column(1, "etag", pa.array(["other"] * 39))])  # changed objects
    skip = SkipIndex(str(tmp_path), "m1", OPTS, exclude_run="r4")
    try:
        assert len(skip.actors) > 1 and skip.found.partitions > 1
        want = _reference_seen(reference.seen, asked)
        assert want.sum() > 20 and np.array_equal(skip.seen_mask(asked), want)
        assert skip.losses.to_pylist() == reference.losses.to_pylist() == [
            {"uri": "k", "etag": "e-k", "modified": -1, "losses": 3}]
        _run(tmp_path, "r4", ["new", "k"], [None, lost_error(1, 4)])  # k: poison now, final
        run = table.runs_by_id(str(tmp_path), OPTS)["r4"]
        skip.commit("r4", run.folder, run.version or "", 2)
    finally:
        skip.close()
    indexed = index.history(str(tmp_path), "m1", OPTS)
    assert set(indexed.runs) == {"r0", "r1", "r2", "r3", "r4"} and indexed.runs == index._read_plan(
        str(tmp_path), "m1", OPTS).indexed  # every run folded in
    (tmp_path / table.INDEX).rename(tmp_path / "_moved")
    full = index.history(str(tmp_path), "m1", OPTS)
    assert sorted(indexed.seen.to_pylist(), key=str) == sorted(full.seen.to_pylist(), key=str)
    assert {"new", "k", "fresh-1"} <= set(indexed.seen.column("uri").to_pylist())
    assert indexed.losses.num_rows == full.losses.num_rows == 0


@pytest.mark.parametrize("damage", ["missing", "truncated", "no fingerprints", "losses"])
def test_an_index_file_that_does_not_read_makes_the_check_read_every_run(tmp_path, damage):
    from ntf_ray.errors import lost_error

    _run(tmp_path, "r1", ["a", "b", "k"], [None, None, lost_error(1, 1)])
    _fold(tmp_path, "r1")
    root = tmp_path / table.INDEX / "model_id=m1"
    (part,) = root.glob("p=*/*.parquet")
    if damage == "missing":
        part.unlink()
    elif damage == "truncated":
        part.write_bytes(part.read_bytes()[:20])
    elif damage == "no fingerprints":  # a file of another writer, without the fingerprint column
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(part).drop_columns([index.FP]), part)
    else:
        (losses,) = root.glob("losses-*.parquet")
        losses.write_bytes(b"not parquet")
    found = index.history(str(tmp_path), "m1", OPTS)  # not an error that stops every later moderate
    assert sorted(found.seen.column("uri").to_pylist()) == ["a", "b"] and list(found.runs) == ["r1"]
    assert [(r["uri"], r["losses"]) for r in found.losses.to_pylist()] == [("k", 1)]


@pytest.mark.timeout(300)
def test_the_index_actors_read_every_run_when_a_file_of_the_index_does_not_read(local_ray, tmp_path):
    from ntf_ray.ray_edge.scan.skip import SkipIndex

    _run(tmp_path, "r1", ["a", "b"])
    _fold(tmp_path, "r1")
    (part,) = (tmp_path / table.INDEX / "model_id=m1").glob("p=*/*.parquet")
    part.unlink()
    skip = SkipIndex(str(tmp_path), "m1", OPTS, exclude_run="r2")
    try:
        assert skip.settle() and not skip.settle()  # started again once
        assert skip.found.fresh and not skip.found.generations  # every run read again, nothing of the index
        asked = pa.table({"uri": ["a", "b", "c"], "etag": ["e-a", "e-b", "e-c"], "modified": [-1, -1, -1]},
                         schema=KEY_SCHEMA)
        assert skip.seen_mask(asked).tolist() == [True, True, False]
    finally:
        skip.close()
    assert not skip.actors
