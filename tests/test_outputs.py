"""``leafe_fast.outputs.write_json``: whole files or nothing, on success and on a failed write."""

from __future__ import annotations

import errno
import json
import os

import pytest

from leafe_fast.errors import UserError
from leafe_fast.outputs import write_json


def test_writes_whole_file_and_replaces_an_old_one(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "x": object()}, default=lambda o: "obj")
    assert json.loads(path.read_text()) == {"a": 2, "x": "obj"} and path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


@pytest.mark.parametrize("fix", [None, "free disk space"])
def test_a_failed_write_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch, fix):
    path = tmp_path / "r.json"
    write_json(path, {"old": True})

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(UserError if fix else OSError) as info:
        write_json(path, {"new": True}, disk_full_fix=fix)
    if fix:
        assert str(path) in str(info.value) and fix in str(info.value)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
