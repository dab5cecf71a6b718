import os
import stat

import pytest

from whisfusion_cli.fileio import atomic_path, write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    p = write_atomic(tmp_path / "sub" / "a.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["a.txt"]  # no temp file left


def test_published_file_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        p = write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = write_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_directory_is_published_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert (target / "config.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["model"]
