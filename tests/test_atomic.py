"""Atomic writes: readers see the old file or the complete new one; nothing lingers."""

from __future__ import annotations

import errno
import os

import pytest
from PIL import Image

from dbtools.core import atomic
from dbtools.core.atomic import (
    atomic_create,
    atomic_dir,
    atomic_put,
    atomic_save_image,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    is_temporary,
)


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


def test_atomic_create_without_hard_links(tmp_path, monkeypatch):
    def no_links(*_, **__):  # what a FUSE or network mount without hard links answers
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    atomic_create(str(tmp_path / "new" / "x.txt"), b"data")
    assert (tmp_path / "new" / "x.txt").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        atomic_create(str(tmp_path / "new" / "x.txt"), b"other")
    assert (tmp_path / "new" / "x.txt").read_bytes() == b"data"
    assert leftovers(tmp_path / "new") == []


def test_atomic_create_failure_leaves_nothing(tmp_path, monkeypatch):
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", full)
    with pytest.raises(OSError):
        atomic_create(str(tmp_path / "x.txt"), b"data")
    assert list(tmp_path.iterdir()) == []


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


def test_crash_between_the_two_renames_of_a_swap_loses_nothing(tmp_path, monkeypatch):
    from dbtools.train.checkpoints import remove_stale_temporaries

    final = tmp_path / "4"
    with atomic_dir(final) as d:
        (d / "weights.bin").write_text("old run")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old moved aside; the new folder is not yet renamed in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as d:
            (d / "weights.bin").write_text("new run")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not final.exists() and (tmp_path / ".tmp-old-4").is_dir()
    remove_stale_temporaries(tmp_path)  # what a resumed run does at start-up
    assert (final / "weights.bin").read_text() == "old run"
    assert leftovers(tmp_path) == []


def test_next_swap_restores_an_interrupted_one_first(tmp_path):
    (tmp_path / ".tmp-old-7").mkdir()
    (tmp_path / ".tmp-old-7" / "w").write_text("only copy")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "7"):
            raise RuntimeError
    assert (tmp_path / "7" / "w").read_text() == "only copy"
    # A leftover next to a complete folder is not a lost copy: it is not restored.
    (tmp_path / ".tmp-old-7").mkdir()
    assert atomic.restore_interrupted_swaps(tmp_path) == []


def test_published_files_get_the_umask_mode_whatever_the_writer_did(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.ones(1)}, tmp))
        with atomic_dir(tmp_path / "d") as d:
            save_file({"x": torch.ones(1)}, str(d / "w.safetensors"))
            (d / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(d / "run.sh", 0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d" / "run.sh").stat().st_mode & 0o777 == 0o755


def test_a_replaced_file_keeps_its_mode(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, mode in (("shared.txt", 0o664), ("private.txt", 0o600)):
        (tmp_path / name).write_text("old")
        os.chmod(tmp_path / name, mode)
        atomic_write_text(tmp_path / name, "new")
        assert (tmp_path / name).stat().st_mode & 0o777 == mode
        atomic_put(str(tmp_path / name), b"newer")
        assert (tmp_path / name).stat().st_mode & 0o777 == mode
    (tmp_path / "w.safetensors").write_text("old")
    os.chmod(tmp_path / "w.safetensors", 0o644)
    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.ones(1)}, tmp))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
