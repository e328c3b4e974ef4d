"""Shared plumbing: atomic writes leave the old file or the new one, never a part; one cache folder."""
import numpy as np
import pytest

from dali_scp.files import atomic_write, cache_dir
from dali_scp.raster import polygon_area


def test_atomic_write_text_bytes_and_writer(tmp_path):
    p = tmp_path / "a.json"
    atomic_write(p, "{}")
    assert p.read_text() == "{}"
    atomic_write(p, b"\x00\x01", durable=True)
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda f: f.write(b"xyz"))
    assert p.read_bytes() == b"xyz"
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(p, boom)
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["a.txt"]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_SCP_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_polygon_area():
    square = np.array([[0, 0], [4, 0], [4, 3], [0, 3]], float)
    assert polygon_area(square) == 12.0 and polygon_area(square[::-1]) == 12.0
    assert polygon_area(np.reshape([1, 1, 5, 5, 9, 9], (-1, 2))) == 0.0



def test_write_json_in_chunks_is_json_dumps(tmp_path):
    import json

    from dali_scp.files import write_json
    for doc in ({}, {"images": list(range(7)), "info": {"a": [1, 2]}, "annotations": [{"id": i} for i in range(10)]},
                {"empty": []}):
        write_json(tmp_path / "a.json", doc, chunk=3)
        assert (tmp_path / "a.json").read_text() == json.dumps(doc)
