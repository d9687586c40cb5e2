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
