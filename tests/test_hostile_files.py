"""Hostile checkpoint files and arch entries (issue 15, points 6 and 12): every read of untrusted bytes
is bounded, non-regular files are refused at once, and a manifest's architecture is imported only from
a package the user trusts. The hostile files are built here, tiny, from opcodes."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt.errors import IntegrityError, NotRegularFile
from ckpt.formats import inspect_file
from ckpt.lightning_state import top_level_scalars

ROOT = Path(__file__).resolve().parent.parent
GENEROUS = 120  # seconds: a hang shows as a timeout, never a slow machine as a failure


def _torch_zip(path: Path, pkl: bytes, compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
    return path


def _nested_pairs(depth: int = 60) -> bytes:
    """x = []; then `depth` times x = [x, x]: a few hundred bytes, 2**depth objects to a naive walk."""
    ops = b"\x80\x02]q\x00"  # PROTO 2, EMPTY_LIST, BINPUT 0
    ops += b"](h\x00h\x00eq\x00" * depth  # EMPTY_LIST MARK BINGET 0 BINGET 0 APPENDS BINPUT 0
    return ops + b"."


def _hashed_pairs(depth: int = 60) -> bytes:
    """{t: 1} where t = (t', t') nested `depth` deep: building the dict hashes 2**depth tuples."""
    ops = b"\x80\x02})q\x00"  # EMPTY_DICT, EMPTY_TUPLE, BINPUT 0
    ops += b"h\x00h\x00\x86q\x00" * depth  # BINGET 0, BINGET 0, TUPLE2, BINPUT 0
    return ops + b"K\x01s."  # BININT1 1, SETITEM, STOP


def _colliding_keys(n: int = 40_000) -> bytes:
    """A dict of n distinct ints that all hash alike (k * (2**61 - 1) + 1): n**2 / 2 comparisons to build."""
    ops = bytearray(b"\x80\x02}(")
    for k in range(n):
        raw = pickle.encode_long(k * (2**61 - 1) + 1)  # type: ignore[attr-defined]
        ops += b"\x8a" + bytes([len(raw)]) + raw + b"N"  # LONG1 key, NONE value
    return bytes(ops + b"u.")  # SETITEMS, STOP


def _bytearray_bomb() -> bytes:
    """{"w": bytearray(2**31 - 1)}: torch's weights-only loader allows bytearray, which zero-fills 2 GiB."""
    return b"\x80\x02}X\x01\x00\x00\x00wcbuiltins\nbytearray\nJ\xff\xff\xff\x7f\x85Rs."


def _many_globals(n: int = 50_000) -> bytes:
    """A list of n distinct globals: each becomes a stand-in class (about 2.4 KB each)."""
    ops = bytearray(b"\x80\x02](")
    for i in range(n):
        ops += b"cm\ng%d\n" % i
    return bytes(ops + b"e.")


def _deep_tuple_key(depth: int = 100_000) -> bytes:
    """{((((...),),),): 1} nested 100,000 deep: hashing it would overflow the C stack."""
    return b"\x80\x02})" + b"\x85" * depth + b"K\x01s."


def _call_of_a_shared_tuple(depth: int = 60) -> bytes:
    """REDUCE with t = (t', t') nested `depth` deep as the function and 7 as its arguments: Python's own
    error for that call formats the function, which walks the tuple 2**depth times."""
    ops = b"\x80\x02)q\x01"  # EMPTY_TUPLE, BINPUT 1
    ops += b"h\x01h\x01\x86q\x01" * depth  # BINGET 1, BINGET 1, TUPLE2, BINPUT 1
    return ops + b"K\x07R."  # BININT1 7, REDUCE, STOP


HOSTILE = {
    "nested-pairs": (_nested_pairs, "more work"),
    "hashed-pairs": (_hashed_pairs, "more work"),
    "colliding-keys": (_colliding_keys, "more work"),
    "bytearray-bomb": (_bytearray_bomb, "more memory"),
    "many-globals": (_many_globals, "more memory"),
    "deep-tuple-key": (_deep_tuple_key, "nested more than"),
    "call-of-a-shared-tuple": (_call_of_a_shared_tuple, "unreadable pickle"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pickles_are_refused_by_show_and_import_readers(tmp_path: Path, kind: str) -> None:
    build, why = HOSTILE[kind]
    path = _torch_zip(tmp_path / f"{kind}.pt", build())
    assert path.stat().st_size < 1_200_000
    with pytest.raises(IntegrityError, match=why) as caught:
        inspect_file(path)
    assert "refused as hostile" in str(caught.value) or "unreadable pickle" in str(caught.value)
    if kind != "nested-pairs":  # reading the top level alone builds the pickle: the same limits hold
        with pytest.raises(IntegrityError, match=why):
            top_level_scalars(path)


def test_the_bytearray_bomb_never_reaches_torch(tmp_path: Path) -> None:
    from ckpt.loading import load_state_dict

    path = _torch_zip(tmp_path / "b.pt", _bytearray_bomb())
    with pytest.raises(IntegrityError, match="more memory"):
        load_state_dict(path)


def test_a_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    big = b"\x80\x02" + b"N0" * (10 * 2**20) + b"N."  # 20 MiB of pickle, deflated to ~20 KB
    path = _torch_zip(tmp_path / "bomb.pt", big, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    with pytest.raises(IntegrityError, match="zip bomb"):
        inspect_file(path)
    with pytest.raises(IntegrityError, match="zip bomb"):
        top_level_scalars(path)


def test_shared_and_ordinary_pickles_still_read(tmp_path: Path) -> None:
    """Limits count visits, not files: tied weights (one tensor under two names) and a Lightning-style
    dict with a few thousand entries read as before."""
    torch = pytest.importorskip("torch")
    w = torch.zeros(2, 3)
    state = {"encoder.weight": w, "decoder.weight": w, **{f"b{i}": torch.zeros(1) for i in range(3000)}}
    torch.save({"state_dict": state, "epoch": 4, "global_step": 99, "history": list(range(50_000))}, tmp_path / "a.pt")
    info = inspect_file(tmp_path / "a.pt")
    assert len(info.tensors) == 3002 and info.tensors[0].name == "encoder.weight"  # as named in the state dict
    assert info.weights_under == "state_dict"
    assert top_level_scalars(tmp_path / "a.pt") == {"epoch": 4, "global_step": 99}
    from ckpt.loading import load_state_dict

    assert len(load_state_dict(tmp_path / "a.pt")) == 3002


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "000099.pt"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match="is a FIFO"):
        inspect_file(fifo)  # opening a FIFO without a writer would block forever
    with pytest.raises(NotRegularFile):
        top_level_scalars(fifo)
    from ckpt import hashing

    with pytest.raises(NotRegularFile):
        hashing.sha256_file(fifo)
    assert isinstance(hashing.sha256_many([fifo])[0], NotRegularFile)
    if os.path.exists("/dev/zero"):
        with pytest.raises(NotRegularFile, match="character device"):
            inspect_file(Path("/dev/zero"))


def _ckpt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=GENEROUS
    )


def test_commands_end_with_exit_6_on_hostile_files(tmp_path: Path) -> None:
    """The issue's cases through real processes, each under a generous timeout (a hang fails the test)."""
    ws = ckpt.Workspace.init(tmp_path / "ws")
    task = ws.create_task("t", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2, "width": 4, "depth": 1})
    task.save_file(_torch_zip(tmp_path / "nest.pt", _nested_pairs()))
    big = b"\x80\x02" + b"N0" * (10 * 2**20) + b"N."
    task.save_file(_torch_zip(tmp_path / "bomb.pt", big, zipfile.ZIP_DEFLATED))
    task.save(b"plain bytes")
    w = str(ws.root)
    for number in ("1", "2"):
        res = _ckpt("-w", w, "show", "t", number, cwd=tmp_path)
        assert res.returncode == 6, res.stderr
        assert "Traceback" not in res.stderr
    cdir = ws.root / "tasks" / "t" / "checkpoints"
    third = next(cdir.glob("000003.*"))
    third.unlink()
    os.mkfifo(third)  # a recorded checkpoint that became a FIFO
    os.mkfifo(cdir / "000099.pt")  # and one no record names
    for args in (["show", "t", "3"], ["verify", "t"], ["scan", "t", "--add"]):
        res = _ckpt("-w", w, *args, cwd=tmp_path)
        assert res.returncode == 6, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
    assert stat.S_ISFIFO(os.lstat(cdir / "000099.pt").st_mode)  # nothing was moved
    if os.path.exists("/dev/zero"):
        res = _ckpt("-w", w, "import", "/dev/zero", "--task", "z", cwd=tmp_path)
        assert res.returncode == 6 and "character device" in res.stderr, res.stderr
        assert "z" not in ws.task_names()


def test_load_state_dict_and_preview_refuse_the_nested_pickle(tmp_path: Path) -> None:
    """torch itself loads [x, x] nested 60 deep; what walks it afterwards would not end: refused first."""
    pytest.importorskip("torch")
    ws = ckpt.Workspace.init(tmp_path / "ws")
    task = ws.create_task("t", arch="ckpt.zoo:UNet", arch_kwargs={"classes": 2, "width": 4, "depth": 1})
    task.save_file(_torch_zip(tmp_path / "nest.pt", _nested_pairs()))
    os.mkfifo(tmp_path / "fifo.pt")
    code = (
        "import sys; from pathlib import Path; from ckpt.loading import load_state_dict\n"
        "from ckpt.errors import CkptError\n"
        "try:\n    load_state_dict(Path(sys.argv[1]))\nexcept CkptError as e:\n    sys.exit(e.exit_code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for target in (tmp_path / "nest.pt", tmp_path / "fifo.pt"):
        res = subprocess.run([sys.executable, "-c", code, str(target)], env=env, timeout=GENEROUS, capture_output=True)
        assert res.returncode == 6, res.stderr
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "im.png")
    res = _ckpt("-w", str(ws.root), "preview", "t", "1", "--images", str(tmp_path / "im.png"), cwd=tmp_path)
    assert res.returncode == 6 and "refused as hostile" in res.stderr, res.stderr


# --- preview's arch: imported only from packages the user trusts ------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    np = pytest.importorskip("numpy")
    from PIL import Image

    path = tmp_path / "im.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    return path


def _arch_task(ws: ckpt.Workspace, arch: str) -> None:
    ws.create_task("a", arch=arch).save(b"not read: the network is built first")


def test_an_untrusted_arch_is_refused_before_its_module_is_imported(
    ws: ckpt.Workspace, image: Path, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CKPT_TRUSTED_ARCH", raising=False)
    if "this" in sys.modules:
        pytest.skip("the module 'this' is already imported")
    _arch_task(ws, "this:Nope")
    (ws.root / "ckpt.toml").write_text((ws.root / "ckpt.toml").read_text() + '\ntrusted_arch = ["this"]\n')
    result = run("preview", "a", "1", "--images", str(image), "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 6, result.output
    assert "package 'this', which is not trusted" in result.stderr and "CKPT_TRUSTED_ARCH=this" in result.stderr
    assert "this" not in sys.modules  # refused before import: importing `this` prints the Zen of Python


@pytest.mark.parametrize("how", ["env", "config", "--arch"])
def test_the_user_can_trust_a_package(
    ws: ckpt.Workspace,
    image: Path,
    run: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    how: str,
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CKPT_TRUSTED_ARCH", raising=False)
    _arch_task(ws, "json:Nope")
    extra: list[str] = []
    if how == "env":
        monkeypatch.setenv("CKPT_TRUSTED_ARCH", "pkg_a, json")
    elif how == "config":
        (tmp_path / "config" / "ckpt").mkdir(parents=True)
        (tmp_path / "config" / "ckpt" / "config.toml").write_text('trusted_arch = ["json"]\n')
    else:
        extra = ["--arch", "json:Nope"]
    result = run("preview", "a", "1", "--images", str(image), "--out", str(tmp_path / "o.png"), *extra)
    assert result.exit_code == 2, result.output  # trusted: imported, and then it has no 'Nope'
    assert "module 'json' has no 'Nope'" in result.stderr


def test_a_trusted_package_does_not_trust_its_namesakes(
    ws: ckpt.Workspace, image: Path, run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CKPT_TRUSTED_ARCH", "js")
    _arch_task(ws, "json.decoder:Nope")  # 'js' trusts js and js.*, not json
    result = run("preview", "a", "1", "--images", str(image), "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 6 and "package 'json'" in result.stderr, result.output
    ws.create_task("b", arch="ckpt.zoo.UNet:x").save(b"x")  # ckpt.zoo.* is trusted by default
    result = run("preview", "b", "1", "--images", str(image), "--out", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "cannot import module 'ckpt.zoo.UNet'" in result.stderr, result.output


def test_import_never_waits_on_a_fifo_among_a_runs_side_files(tmp_path: Path) -> None:
    """metrics.csv (Lightning) and trainer_state.json (Trainer) are metadata: a FIFO or a device there is
    read as no metadata, at once; the checkpoints still come in."""
    lit = tmp_path / "lightning_logs" / "version_0"
    (lit / "checkpoints").mkdir(parents=True)
    (lit / "checkpoints" / "epoch=0-step=10.ckpt").write_bytes(b"not a zip")
    os.mkfifo(lit / "metrics.csv")
    hf = tmp_path / "hf-out"
    (hf / "checkpoint-10").mkdir(parents=True)
    (hf / "checkpoint-10" / "model.safetensors").write_bytes(b"\0" * 8)
    os.mkfifo(hf / "checkpoint-10" / "trainer_state.json")
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", hf / "trainer_state.json")
    ws = ckpt.Workspace.init(tmp_path / "ws")
    for src, task in ((lit, "lit"), (hf, "hf")):
        res = _ckpt("-w", str(ws.root), "import", str(src), "--task", task, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert len(ws.task(task).checkpoints) == 1
