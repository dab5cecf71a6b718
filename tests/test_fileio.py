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


@pytest.mark.parametrize("is_dir", [False, True])
def test_ctrl_c_while_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, is_dir):
    """A KeyboardInterrupt that lands right after the temporary exists, before the writer has its name (in
    tempfile.mkstemp that was a leak): the temporary is still removed."""
    from whisfusion_cli import fileio

    make = os.mkdir if is_dir else os.open

    def made_then_interrupted(*args, **kwargs):
        result = make(*args, **kwargs)
        if not is_dir:
            os.close(result)
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "mkdir" if is_dir else "open", made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.srt", is_dir=is_dir):
            pass
    assert os.listdir(tmp_path) == []


def test_a_temporary_name_taken_by_another_writer_is_left_alone(tmp_path, monkeypatch):
    from whisfusion_cli import fileio

    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: "same")
    theirs = tmp_path / ".out.txt.same.tmp"
    theirs.write_text("another writer's")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "out.txt", "ours")
    assert theirs.read_text() == "another writer's" and not (tmp_path / "out.txt").exists()
