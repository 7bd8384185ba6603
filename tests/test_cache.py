"""Caches shared by several processes: temporaries belong to their writer, generation is locked,
writes reach the disk before the rename. Each test uses real processes (fork)."""
import multiprocessing
import os
import socket
import time

import pytest

from vidret_lib import cache
from vidret_lib.cache import atomic_write, folder_lock, remove_stale_temporaries

FORK = multiprocessing.get_context("fork")
TINY = {"n_train": 2, "n_val": 1, "n_test": 1, "family_size": 1}


def _write_blocked(path, started, release):
    """Child: atomic_write(path) whose writer waits for ``release`` half-way (a live, slow writer)."""

    def write(tmp):
        with open(tmp, "wb") as fh:  # one open file, as an encoder writes: deleting the name loses it
            fh.write(b"half")
            fh.flush()
            started.set()
            assert release.wait(60)
            fh.write(b"+done")

    atomic_write(path, write)


def _killed_while_writing(path):
    def write(tmp):
        tmp.write_bytes(b"half")
        os._exit(9)  # as a SIGKILL: no cleanup runs

    atomic_write(path, write)


def _generate(out):
    from data_prep.synthetic import generate

    generate(out, "smoke", **TINY)


def test_a_live_writers_temporary_survives_a_generation_into_the_same_folder(tmp_path):
    from data_prep.synthetic import generate

    generate(tmp_path / "ds", "smoke", **TINY)
    video = sorted((tmp_path / "ds" / "videos").glob("*.mp4"))[0]
    video.unlink()  # the live writer below is re-rendering it
    started, release = FORK.Event(), FORK.Event()
    writer = FORK.Process(target=_write_blocked, args=(video, started, release))
    writer.start()
    try:
        assert started.wait(60)
        generate(tmp_path / "ds", "smoke", **TINY)  # cleans the folder's temporaries of dead writers only
    finally:
        release.set()
        writer.join(60)
    assert writer.exitcode == 0, "the other process's temporary file was deleted under it"
    assert video.read_bytes() == b"half+done"


def test_two_concurrent_generations_into_one_folder_both_succeed(tmp_path):
    from data_prep.synthetic import generate

    out = tmp_path / "ds"
    first = FORK.Process(target=_generate, args=(out,))
    first.start()
    deadline = time.monotonic() + 60
    while first.is_alive() and not list(out.glob("videos/.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)  # start the second one while the first is writing a video
    second = FORK.Process(target=_generate, args=(out,))
    second.start()
    first.join(120)
    second.join(120)
    assert (first.exitcode, second.exitcode) == (0, 0)
    reference = generate(tmp_path / "alone", "smoke", **TINY).root
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files(out) == files(reference) and not list(out.rglob("*.tmp"))


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "x.json"
    child = FORK.Process(target=_killed_while_writing, args=(target,))
    child.start()
    child.join(60)
    assert child.exitcode == 9 and len(list(tmp_path.glob(".x.json*.tmp"))) == 1
    atomic_write(target, lambda tmp: tmp.write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"], "the killed writer's temporary is litter"


def test_stale_temporaries_are_those_of_dead_old_or_unknown_writers(tmp_path):
    host = socket.gethostname()
    dead = FORK.Process(target=lambda: None)
    dead.start()
    dead.join()
    names = {
        "live": f".a~{host}~{os.getpid()}~r1.tmp",
        "dead": f".a~{host}~{dead.pid}~r2.tmp",
        "other_host": f".a~elsewhere~{dead.pid}~r3.tmp",
        "unowned": ".a.k1ll3d.tmp",
        "old": f".b~{host}~{os.getpid()}~r4.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("")
    past = time.time() - cache.STALE_TMP_SECONDS - 10
    os.utime(tmp_path / names["old"], (past, past))
    removed = {p.name for p in remove_stale_temporaries(tmp_path)}
    assert removed == {names["dead"], names["unowned"], names["old"]}
    assert {p.name for p in tmp_path.iterdir()} == {names["live"], names["other_host"]}


def test_atomic_write_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda *a: calls.append(("replace",)) or real_replace(*a))
    atomic_write(tmp_path / "x.txt", lambda tmp: tmp.write_text("data"))
    assert calls == [("fsync", "file"), ("replace",), ("fsync", "dir")]
    assert (tmp_path / "x.txt").read_text() == "data"


def _hold_lock(folder, held, release):
    with folder_lock(folder):
        held.set()
        assert release.wait(60)


def test_folder_lock_excludes_another_process(tmp_path, capfd):
    held, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(tmp_path, held, release))
    holder.start()
    assert held.wait(60)
    waited = []
    FORK.Process(target=lambda: (time.sleep(0.5), release.set())).start()
    start = time.monotonic()
    with folder_lock(tmp_path):
        waited.append(time.monotonic() - start)
    holder.join(60)
    assert waited[0] >= 0.4 and "waiting for another process that holds" in capfd.readouterr().err


@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG"])
def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, code):
    import errno

    target = tmp_path / "results" / "x.json"

    def write(tmp):  # what the OS says when the disk is full or the file size limit is hit
        tmp.write_text("partial")
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    with pytest.raises(OSError, match=rf"cannot write {target}: .*free disk space"):
        atomic_write(target, write)
    assert list(target.parent.iterdir()) == []  # no temporary, no partial file
