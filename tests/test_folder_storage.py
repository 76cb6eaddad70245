"""The store interface on a folder (ckpt.storage.folder): the conditional writes, claims, transfers and deletes
the trash is written on, with the folder's guarantees (never through a link, never replacing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt.errors import IntegrityError, SymlinkError
from ckpt.storage import PreconditionFailed
from ckpt.storage.folder import FolderStorage


@pytest.fixture
def st(tmp_path: Path) -> FolderStorage:
    root = tmp_path / "ws"
    (root / "trash").mkdir(parents=True)
    (root / "tasks" / "t" / "checkpoints").mkdir(parents=True)
    return FolderStorage(root)


def test_conditional_writes(st: FolderStorage) -> None:
    etag = st.put("trash/e/entry.toml", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        st.put("trash/e/entry.toml", b"two", if_none_match=True)
    assert st.get("trash/e/entry.toml") == (b"one", etag)
    newer = st.put("trash/e/entry.toml", b"three", if_match=etag)
    assert newer != etag
    with pytest.raises(PreconditionFailed):  # the version read is gone: the writer that read it loses
        st.put("trash/e/entry.toml", b"four", if_match=etag)
    assert st.get("trash/e/entry.toml")[0] == b"three"
    assert not [p for p in (st.root / "trash" / "e").iterdir() if p.name.endswith(".tmp")]


def test_claim_is_exclusive(st: FolderStorage) -> None:
    assert st.claim("tasks/t/.pending-x", b"x")
    assert not st.claim("tasks/t/.pending-x", b"y")
    assert (st.root / "tasks/t/.pending-x").read_bytes() == b"x"


def test_transfer_renames_and_never_replaces(st: FolderStorage) -> None:
    for n in (1, 2):
        (st.root / f"tasks/t/checkpoints/{n}.pt").write_bytes(b"w%d" % n)
    assert st.transfer("tasks/t", "trash/e/files", ["checkpoints/1.pt", "checkpoints/2.pt"], into_new=True) == []
    assert (st.root / "trash/e/files/checkpoints/2.pt").read_bytes() == b"w2"
    assert not (st.root / "tasks/t/checkpoints/1.pt").exists()
    (st.root / "tasks/t/checkpoints/1.pt").write_bytes(b"new")
    with pytest.raises(PreconditionFailed):  # back into the task: what is there is never replaced
        st.transfer("trash/e/files", "tasks/t", ["checkpoints/1.pt"])
    assert (st.root / "tasks/t/checkpoints/1.pt").read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        st.transfer("tasks/t", "trash/f/files", ["checkpoints/9.pt"], into_new=True)


def test_listing_skips_links_and_counts_links(st: FolderStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"secret")
    (st.root / "tasks/t/checkpoints/a.pt").write_bytes(b"a")
    os.link(st.root / "tasks/t/checkpoints/a.pt", st.root / "tasks/t/checkpoints/b.pt")
    (st.root / "tasks/t/checkpoints/link.pt").symlink_to(outside)
    blobs = st.list_prefix("tasks/t/checkpoints/")
    assert [b.key for b in blobs] == ["tasks/t/checkpoints/a.pt", "tasks/t/checkpoints/b.pt"]
    assert blobs[0].inode == blobs[1].inode and blobs[0].links == 2
    assert "symlink" in st.why_missing("tasks/t/checkpoints/link.pt")
    (st.root / "tasks/u").mkdir()
    (st.root / "tasks/u/checkpoints").write_text("a file where a folder belongs")
    with pytest.raises(IntegrityError, match="not a folder"):
        st.list_prefix("tasks/u/checkpoints/")


def test_no_key_goes_through_a_link(st: FolderStorage, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "entry.toml").write_bytes(b"decoy")
    (st.root / "trash" / "e").symlink_to(elsewhere)
    with pytest.raises(SymlinkError):
        st.get("trash/e/entry.toml")
    with pytest.raises(SymlinkError):
        st.put("trash/e/entry.toml", b"x")
    st.delete(["trash/e"])  # the link itself goes, never what it points at
    assert not os.path.lexists(st.root / "trash" / "e") and (elsewhere / "entry.toml").read_bytes() == b"decoy"
    with pytest.raises(ValueError):
        st.get("trash/../../etc/passwd")


def test_delete_removes_the_folders_it_empties_but_not_the_workspace_s_own(st: FolderStorage) -> None:
    st.put("trash/e/files/checkpoints/1.pt", b"1")
    st.put("trash/e/entry.toml", b"e")
    st.delete(["trash/e/files/checkpoints/1.pt", "trash/e/entry.toml"])
    assert not (st.root / "trash" / "e").exists() and (st.root / "trash").is_dir()
    (st.root / "tasks/t/checkpoints/5").mkdir()
    (st.root / "tasks/t/checkpoints/5/w.bin").write_bytes(b"w")
    st.delete(["tasks/t/checkpoints/5/w.bin"])
    assert not (st.root / "tasks/t/checkpoints/5").exists()
    assert (st.root / "tasks/t/checkpoints").is_dir()  # a task keeps its checkpoints/ even when empty
    st.delete(["tasks/t/checkpoints/missing.pt"])  # idempotent
