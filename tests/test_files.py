"""Atomic writes: all-or-nothing, ordinary permissions, old output kept on failure."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from spinedxa.files import CHECKSUMS, atomic_dir, atomic_path, md5_file, sha256_file, write_checksums, write_json_atomic


def test_hashes_match_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    data = os.urandom(3 * (1 << 20) + 7)  # spans several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert md5_file(f) == hashlib.md5(data).hexdigest()


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"x": 1.5})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as d:
        (d / "old").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "new").write_text("2")
            raise ValueError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old"]
    with atomic_dir(target) as d:
        (d / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "n.json", {"x": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_checksums_list_every_file_but_themselves_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"x")
    (tmp_path / "a.csv").write_text("a\n")
    (tmp_path / CHECKSUMS).write_text("stale\n")  # a rewrite replaces it and never lists it
    path = write_checksums(tmp_path)
    assert path == tmp_path / CHECKSUMS
    assert path.read_text() == (f"{hashlib.sha256(b'a' + bytes([10])).hexdigest()}  a.csv\n"
                                f"{hashlib.sha256(b'x').hexdigest()}  b/x.png\n")
