"""Atomic writes: readers see the old file or the complete new one; nothing lingers."""

from __future__ import annotations

import os
import sys

import pytest
from PIL import Image

from dbtools import atomic
from dbtools.atomic import (atomic_create, atomic_dir, atomic_put, atomic_save_image,
                            atomic_write, atomic_write_bytes, atomic_write_text, is_temporary)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if is_temporary(p)]


def test_write_text_and_bytes(tmp_path):
    assert atomic_write_text(tmp_path / "sub" / "a.txt", "héllo\n") == tmp_path / "sub" / "a.txt"
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "héllo\n".encode()
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 200_000, fsync=False)
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 200_000
    atomic_write_text(tmp_path / "a.bin", "new")
    assert (tmp_path / "a.bin").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_interrupted_bytes_write_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "c.txt"

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_put(str(target), b"data")
    assert not target.exists() and leftovers(tmp_path) == []


def test_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_create(str(tmp_path / "b.txt"), b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_temp_name_fits_next_to_a_255_byte_name(tmp_path):
    name = "a" * 251 + ".txt"
    atomic_write_text(tmp_path / name, "long")
    assert (tmp_path / name).read_text() == "long"


def test_atomic_create_never_replaces(tmp_path):
    target = tmp_path / "caption.txt"
    atomic_create(str(target), b"first", fsync=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        atomic_create(str(target), b"second")
    assert target.read_bytes() == b"first" and leftovers(tmp_path) == []
    if sys.platform.startswith("linux"):  # the unnamed-file path works here, no fallback
        assert atomic._unnamed_files_work


def test_atomic_create_portable_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_unnamed_files_work", False)
    atomic_create(str(tmp_path / "new" / "x.txt"), b"data")
    assert (tmp_path / "new" / "x.txt").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        atomic_create(str(tmp_path / "new" / "x.txt"), b"other")
    assert (tmp_path / "new" / "x.txt").read_bytes() == b"data"


def test_save_image(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    atomic_save_image(img, tmp_path / "a.png")
    atomic_save_image(img, tmp_path / "b.jpg", quality=95)
    assert Image.open(tmp_path / "a.png").getpixel((0, 0)) == (10, 20, 30)
    assert Image.open(tmp_path / "b.jpg").format == "JPEG"
    with pytest.raises(ValueError):
        atomic_save_image(img, tmp_path / "c.unknownext")
    assert leftovers(tmp_path) == []


def test_atomic_dir_success_and_replace(tmp_path):
    final = tmp_path / "step-500"
    with atomic_dir(final) as d:
        (d / "weights.bin").write_text("v1")
        assert not final.exists() and is_temporary(d)
    assert (final / "weights.bin").read_text() == "v1"
    with atomic_dir(final) as d:
        (d / "weights.bin").write_text("v2")
    assert (final / "weights.bin").read_text() == "v2"
    assert leftovers(tmp_path) == []
    with pytest.raises(FileExistsError):
        with atomic_dir(final, replace=False) as d:
            (d / "weights.bin").write_text("v3")
    assert (final / "weights.bin").read_text() == "v2" and leftovers(tmp_path) == []


def test_atomic_dir_exception_leaves_final_untouched(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights.bin").write_text("good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as d:
            (d / "weights.bin").write_text("half")
            raise KeyboardInterrupt
    assert (final / "weights.bin").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # A folder that never existed does not appear either.
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "new"):
            raise RuntimeError
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
