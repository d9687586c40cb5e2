"""Atomic writes: all-or-nothing results that carry the permissions of a plain write."""

import os
import stat

import pytest

from pathanat.atomic import atomic_dir, atomic_file, current_umask
from pathanat.errors import PathanatError


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_results_get_the_permissions_of_a_plain_write(tmp_path, umask):
    plain_file = tmp_path / "plain.txt"
    plain_file.write_text("x")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    with atomic_file(tmp_path / "result.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "array.npy").write_bytes(b"x")
    assert mode(tmp_path / "result.txt") == mode(plain_file)
    assert mode(tmp_path / "cache") == mode(plain_dir)
    assert mode(tmp_path / "cache" / "array.npy") == mode(plain_file)


def test_a_failed_write_leaves_the_old_result_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "kept").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "new").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in folder.iterdir()] == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "metrics.json"]
    with pytest.raises(PathanatError, match="already exists; pass --overwrite"), atomic_dir(folder):
        pass


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "last.ckpt"
        stale_file = tmp_path / f".last.ckpt.{host}-{dead_pid}.abc.tmp-write"
        stale_file.write_bytes(b"half a checkpoint")
        live_file = tmp_path / f".last.ckpt.{host}-{alive.pid}.def.tmp-write"
        live_file.write_bytes(b"being written")
        other_host = tmp_path / f".last.ckpt.elsewhere-{dead_pid}.ghi.tmp-write"
        other_host.write_bytes(b"another node's")
        other_target = tmp_path / f".step300.ckpt.{host}-{dead_pid}.jkl.tmp-write"
        other_target.write_bytes(b"not this target's")
        with atomic_file(target) as tmp:
            tmp.write_text("whole")
        assert not stale_file.exists()
        assert live_file.exists() and other_host.exists() and other_target.exists()
        stale_dir = tmp_path / f".cache.{host}-{dead_pid}.mno.tmp-write"
        stale_dir.mkdir()
        (stale_dir / "train_image.npy").write_bytes(b"8.7 MB of it")
        with atomic_dir(tmp_path / "cache") as tmp:
            (tmp / "manifest.json").write_text("{}")
        assert not stale_dir.exists() and (tmp_path / "cache" / "manifest.json").is_file()
    finally:
        alive.kill()
        alive.wait()


def test_a_second_writer_of_a_folder_stops_while_the_first_writes(tmp_path):
    import subprocess
    import sys
    import time

    target = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathanat.atomic import atomic_dir
with atomic_dir({str(target)!r}) as tmp:
    (tmp / "started").write_text("")
    print("writing", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        with pytest.raises(PathanatError, match="being written by another"), atomic_dir(target):
            pass
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with atomic_dir(target) as tmp:  # a killed writer leaves no lock: the next one proceeds
        (tmp / "done").write_text("")
    assert [p.name for p in target.iterdir()] == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no lock, no temporaries
