"""The local folder of shard files fetched from a bucket: entries by digest, least recently used out first."""

import os
import time

from pipeline.store.cache import ShardCache


def test_entries_round_trip_and_the_least_recently_used_go_first(tmp_path):
    cache = ShardCache(tmp_path / "c", max_bytes=300)
    for name in ("aa01", "bb02", "cc03"):
        cache.put(name, name.encode() * 25)  # 100 bytes each: the folder is at its bound
        time.sleep(0.01)
    old = time.time() - 100
    for age, name in enumerate(("bb02", "aa01", "cc03")):  # used in this order, bb02 longest ago
        os.utime(cache.path(name), (old + age, old + age))
    assert cache.get("aa01") == b"aa01" * 25  # a use: aa01 is the most recent now
    cache.put("dd04", b"d" * 100)
    cache.evict()  # 400 bytes in a folder of 300: the least recently used entry goes
    assert sorted(p.stem for _, _, p in cache.entries()) == ["aa01", "cc03", "dd04"]
    cache.put("ee05", b"e" * 100)
    cache.evict()  # then the next least recently used (cc03, not aa01: aa01 was read)
    assert sorted(p.stem for _, _, p in cache.entries()) == ["aa01", "dd04", "ee05"]
    assert cache.get("aa01") == b"aa01" * 25 and sum(size for _, size, _ in cache.entries()) == 300


def test_an_entry_is_placed_whole_and_a_missing_one_is_none(tmp_path):
    cache = ShardCache(tmp_path, max_bytes=10**6)
    assert cache.get("ffff") is None
    cache.put("ffff", b"x" * 1000)
    assert [p.name for p in (tmp_path / "ff").iterdir()] == ["ffff.shard"]  # no temporary file left beside it
    cache.drop("ffff")
    assert cache.get("ffff") is None


def test_a_store_read_through_the_cache_keeps_checked_files_and_fetches_a_bad_entry_again(tmp_path):
    from test_cache import written_store

    from pipeline.store.teacher_store import TeacherStore

    store = written_store(tmp_path / "s.zarr")
    fields = ["labels", "teachers/t1/cam", "teachers/t1/y_prob"]
    plain = store.read_rows(0, store.num_samples, fields)
    cache = ShardCache(tmp_path / "cache", max_bytes=10**6)
    cached = TeacherStore.open(tmp_path / "s.zarr", cache=cache)

    def same_rows():
        rows = cached.read_rows(0, store.num_samples, fields)
        assert all((rows[f] == plain[f]).all() for f in fields)

    same_rows()
    files = {(f, b): store.location / store.shard_key(f, b) for f in fields for b in range(store.num_blocks)}
    names = {place: store.digests.bound(*place, 0)[1].hex() for place in files}
    assert sorted(p.stem for _, _, p in cache.entries()) == sorted(names.values())  # one entry a file read
    assert all(cache.path(names[place]).read_bytes() == path.read_bytes() for place, path in files.items())

    entry = cache.path(names["teachers/t1/cam", 1])
    damaged = bytearray(entry.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    entry.write_bytes(bytes(damaged))  # a damaged entry ...
    other = cache.path(names["teachers/t1/cam", 0])
    other.write_bytes(files["teachers/t1/cam", 2].read_bytes())  # ... and a sound file of another block under its name
    same_rows()  # are both refused, dropped and fetched again
    assert entry.read_bytes() == files["teachers/t1/cam", 1].read_bytes()
    assert other.read_bytes() == files["teachers/t1/cam", 0].read_bytes()
