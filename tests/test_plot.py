"""ckpt plot, ckpt report and the sparklines of ckpt list: real tasks, real files, marks counted in the SVG,
the report's page checked for anything it would fetch, and opened in headless Chromium."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import plot as core
from ckpt.trash import KeepRules, trash_unused
from ckpt.workspace import Incoming

pytest.importorskip("matplotlib")

NAN = float("nan")
SVG = "{http://www.w3.org/2000/svg}"


def marks(svg: Path | bytes) -> dict[str, int]:
    """The number of markers (`<use>` elements) in each group whose id starts with `mark-`."""
    root = ET.fromstring(svg.read_bytes() if isinstance(svg, Path) else svg)
    return {
        g.get("id", ""): sum(1 for _ in g.iter(f"{SVG}use"))
        for g in root.iter(f"{SVG}g")
        if g.get("id", "").startswith("mark-")
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def rich_task(ws: ckpt.Workspace) -> ckpt.Task:
    """Task 'unet', 12 checkpoints: val_loss (a NaN at #4, falling), acc (rising), val_iou from #7 on only; a model
    from #5; #1-#3 in the trash."""
    t = ws.create_task("unet")
    for i in range(1, 13):
        m = {"val_loss": NAN if i == 4 else 1 / i, "acc": i / 12}
        if i >= 7:
            m["val_iou"] = i / 20
        t.save(os.urandom(64), step=i * 10, epoch=i, metrics=m)
    ws.promote("unet", 5, title="unet-five")
    trash_unused(ws, "unet", KeepRules(keep_last=9))  # trashes 1-3 (4-12 kept: last 9)
    return t


def big_task(ws: ckpt.Workspace, tmp: Path, name: str = "big", n: int = 10_000) -> ckpt.Task:
    """`n` checkpoints added in one call, each a hard link to one small file (0.3 s for 10,000)."""
    t = ws.create_task(name)
    src = tmp / f"{name}-src.pt"
    data = b"w" * 64
    src.write_bytes(data)
    sha, dev = hashlib.sha256(data).hexdigest(), os.stat(src).st_dev
    t.add_existing(
        [
            Incoming(src, f"{i}.pt", 64, sha, step=i * 10, metrics={"val_loss": 1 / i, "lr": 1e-3}, dev=dev)
            for i in range(1, n + 1)
        ],
        mode="link",
    )
    return t


# --- ckpt plot --------------------------------------------------------------------------------------------------


def test_plot_svg_marks_each_checkpoint_model_latest_best_and_trash(ws, run_json, tmp_path):
    rich_task(ws)
    out = tmp_path / "p.svg"
    got = run_json("plot", "unet", "--out", str(out))
    assert got["output"] == str(out) and got["format"] == "svg" and got["x"] == "step"
    assert got["metrics"] == ["acc", "val_iou", "val_loss"]
    m = marks(out)
    # live: 4-12 (9); val_loss has no value at #4 (NaN); val_iou only from #7
    assert m["mark-checkpoint-unet-acc"] == 9
    assert m["mark-checkpoint-unet-val_loss"] == 8
    assert m["mark-checkpoint-unet-val_iou"] == 6
    assert m["mark-trash-unet-acc"] == 3 and m["mark-trash-unet-val_loss"] == 3
    assert "mark-trash-unet-val_iou" not in m  # #1-#3 never recorded val_iou
    assert m["mark-latest-unet-acc"] == 1 and m["mark-best-unet-val_loss"] == 1
    assert m["mark-model-unet-acc"] == 1 and "mark-model-unet-val_iou" not in m  # #5 has no val_iou
    assert not any(k.startswith("mark-plan") for k in m)
    assert got["marks"]["checkpoint"] == 9 + 8 + 6
    task = got["tasks"][0]
    assert task["trashed"] == [1, 2, 3] and task["latest"] == 12 and task["models"] == {"unet-five": 5}
    assert task["best"]["val_loss"] == {"number": 12, "value": 1 / 12, "direction": "min", "direction_source": "name"}
    assert task["best"]["acc"]["number"] == 12
    assert out.read_text().count("unet-five") == 2  # its label, in the two panels where #5 has a value


def test_plot_png_has_the_expected_size(ws, run_json, tmp_path):
    rich_task(ws)
    got = run_json("plot", "unet", "--metric", "val_loss", "--out", str(tmp_path / "p.png"))
    assert png_size(tmp_path / "p.png") == (got["width"], got["height"]) == (800, 370)
    got = run_json("plot", "unet", "--out", str(tmp_path / "p.png"))  # --out replaces: three panels now
    assert png_size(tmp_path / "p.png") == (800, 850)


def test_plot_with_plan_marks_what_trash_unused_would_do(ws, run_json, tmp_path):
    rich_task(ws)
    got = run_json("plot", "unet", "-m", "acc", "--keep-last", "2", "--out", str(tmp_path / "p.svg"))
    assert got["tasks"][0]["would_trash"] == [4, 6, 7, 8, 9, 10]  # kept: 5 (a model), 11, 12
    plan = trash_unused(ws, "unet", KeepRules(keep_last=2), dry_run=True).plan
    assert got["tasks"][0]["would_trash"] == plan.trashed
    m = marks(tmp_path / "p.svg")
    assert m["mark-plan_trash-unet-acc"] == 6 and m["mark-plan_keep-unet-acc"] == 3
    assert len(ws.task("unet").checkpoints) == 9  # nothing moved


def test_plot_keep_best_needs_one_metric(ws, run):
    rich_task(ws)
    r = run("plot", "unet", "--keep-best", "2")
    assert r.exit_code == 2 and "--keep-best" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plot_one_checkpoint(ws, run_json, tmp_path):
    ws.create_task("one").save(b"x", step=5, metrics={"val_loss": 0.3})
    got = run_json("plot", "one", "--out", str(tmp_path / "one.svg"))
    m = marks(tmp_path / "one.svg")
    assert m["mark-checkpoint-one-val_loss"] == m["mark-latest-one-val_loss"] == m["mark-best-one-val_loss"] == 1
    assert got["tasks"][0]["best"]["val_loss"]["number"] == 1


def test_plot_ten_thousand_checkpoints(ws, run_json, tmp_path):
    big_task(ws, tmp_path)
    got = run_json("plot", "big", "-m", "val_loss", "--out", str(tmp_path / "big.svg"))
    m = marks(tmp_path / "big.svg")
    assert m["mark-checkpoint-big-val_loss"] == 10_000
    assert m["mark-latest-big-val_loss"] == m["mark-best-big-val_loss"] == 1
    assert got["tasks"][0]["best"]["val_loss"]["number"] == 10_000


def test_plot_several_tasks_share_the_panels(ws, run_json, tmp_path):
    rich_task(ws)
    other = ws.create_task("other")
    for i in range(1, 5):
        other.save(b"o", epoch=i, step=i * 10, metrics={"val_loss": 2 / i})
    got = run_json("plot", "unet", "other", "--metric", "val_loss", "--out", str(tmp_path / "both.svg"))
    assert [t["task"] for t in got["tasks"]] == ["unet", "other"] and got["metrics"] == ["val_loss"]
    m = marks(tmp_path / "both.svg")
    assert m["mark-checkpoint-unet-val_loss"] == 8 and m["mark-checkpoint-other-val_loss"] == 4
    assert m["mark-best-other-val_loss"] == 1


def test_plot_x_falls_back_to_epoch_then_number(ws, run_json, tmp_path):
    t = ws.create_task("e")
    for i in range(1, 4):
        t.save(b"e", epoch=i, metrics={"acc": i})
    assert run_json("plot", "e", "--out", str(tmp_path / "e.png"))["x"] == "epoch"
    ws.create_task("n").save(b"n", metrics={"acc": 1.0})
    assert run_json("plot", "n", "--out", str(tmp_path / "n.png"))["x"] == "number"


def test_plot_unknown_direction_marks_no_best(ws, run, tmp_path):
    t = ws.create_task("u")
    for i in range(1, 4):
        t.save(b"u", step=i, metrics={"score": i})
    r = run("plot", "u", "--json", "--out", str(tmp_path / "u.svg"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tasks"][0]["best"] == {"score": None}
    assert "no best marked for 'score'" in r.stderr
    assert "mark-best-u-score" not in marks(tmp_path / "u.svg")
    (ws.root / "ckpt.toml").write_text('format = 1\n[metrics]\nscore = "max"\n')
    r = run("plot", "u", "--json", "--out", str(tmp_path / "u.svg"))
    assert json.loads(r.stdout)["tasks"][0]["best"]["score"]["number"] == 3


def test_plot_without_out_writes_a_new_file_and_never_overwrites(ws, run, tmp_path):
    rich_task(ws)
    (tmp_path / "plot-unet.png").write_bytes(b"mine")
    r = run("plot", "unet")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("wrote plot-unet-2.png (")
    assert (tmp_path / "plot-unet.png").read_bytes() == b"mine"
    r = run("plot", "unet", "--json")
    assert json.loads(r.stdout)["output"] == "plot-unet-3.png"
    assert png_size(tmp_path / "plot-unet-3.png")[0] == 800


def test_plot_shows_inline_at_an_image_terminal(ws, run, tmp_path, monkeypatch):
    rich_task(ws)
    monkeypatch.setattr("ckpt.cli.plot._stdout_tty", lambda: True)
    monkeypatch.setenv("TERM", "xterm-kitty")
    r = run("plot", "unet", "-m", "acc")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("\x1b_Ga=T,f=100,") and r.stdout.endswith("\x1b\\\n")
    assert not list(tmp_path.glob("plot-*"))  # shown, not written
    monkeypatch.setenv("TERM", "xterm-256color")
    r = run("plot", "unet", "-m", "acc")
    assert r.stdout.startswith("wrote plot-unet.png")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "1"}, "kitty"),
        ({"TERM_PROGRAM": "iTerm.app"}, "iterm2"),
        ({"TERM_PROGRAM": "WezTerm"}, "iterm2"),
        ({"TERM": "foot"}, "sixel"),
        ({"TERM": "xterm-256color"}, None),
        ({}, None),
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, None),
        ({"TERM": "screen-256color", "TERM_PROGRAM": "iTerm.app"}, None),
        ({"TERM": "xterm-kitty", "CKPT_IMAGES": "none"}, None),
        ({"CKPT_IMAGES": "sixel"}, "sixel"),
    ],
)
def test_image_protocol_from_the_environment(env, expected):
    assert core.image_protocol(env) == expected


def test_inline_images_encode_the_png():
    import base64

    png = bytes(range(256)) * 36  # 9,216 bytes: 12,288 in base64, three kitty chunks of 4,096
    kitty = core.inline_image(png, "kitty")
    chunks = re.findall(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\", kitty)
    assert [c[0] for c in chunks] == ["a=T,f=100,m=1", "m=1", "m=0"]
    assert base64.b64decode("".join(c[1] for c in chunks)) == png
    iterm = core.inline_image(png, "iterm2")
    assert iterm.startswith(f"\x1b]1337;File=inline=1;size={len(png)};") and iterm.endswith("\x07\n")


def test_sixel_of_a_real_plot(ws):
    rich_task(ws)
    picture = core.render(core.collect(ws, ["unet"], ["acc"]), "png", dpi=30)
    six = core.sixel(picture.data)
    assert six.startswith(f'\x1bP0;1;0q"1;1;{picture.width};{picture.height}') and six.endswith("\x1b\\\n")
    assert six.count("-") >= picture.height // 6  # one band of six rows per line


def test_default_name_and_write_new(tmp_path):
    assert core.default_name(["unet"]) == "plot-unet.png"
    assert core.default_name(["a", "b"], ".html", "report") == "report-a-b.html"
    assert core.default_name(["x y/../z"]) == "plot-x_y_.._z.png"
    first = core.write_new(tmp_path, "plot-t.png", b"1")
    second = core.write_new(tmp_path, "plot-t.png", b"2")
    assert (first.name, second.name) == ("plot-t.png", "plot-t-2.png")
    assert first.read_bytes() == b"1" and second.read_bytes() == b"2"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["plot", "nope"], 3, "nope"),
        (["plot", "unet", "-m", "missing"], 2, "known metrics: acc, val_iou, val_loss"),
        (["plot", "unet", "--out", "p.jpg"], 2, ".png or .svg"),
        (["plot", "unet", "--x", "time"], 2, "step, epoch, number"),
        (["plot", "unet", "--out", "no/such/dir/p.png"], 2, "does not exist"),
        (["report", "unet", "--out", "r.pdf"], 2, ".html"),
        (["report", "unet", "3"], 2, "--preview"),
        (["report", "unet", "--preview", "--images", "x"], 2, "checkpoint numbers"),
    ],
)
def test_errors_are_one_line_with_the_exit_code(ws, run, args, code, words):
    rich_task(ws)
    r = run(*args)
    assert r.exit_code == code, r.output
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_plot_of_a_task_without_metrics_says_so(ws, run):
    ws.create_task("bare").save(b"b", step=1)
    r = run("plot", "bare", "--out", "b.png")
    assert r.exit_code == 2 and "record(s) no metrics" in r.stderr and not Path("b.png").exists()


# --- sparklines in ckpt list ------------------------------------------------------------------------------------


def test_sparkline_is_cheap_text():
    assert core.sparkline([]) == "" and core.sparkline([None, None]) == ""
    assert core.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert core.sparkline([0.5, 0.5]) == "▄▄"  # flat: the middle
    assert core.sparkline([1, None, 3]) == "▁ █"  # a gap where no finite value
    assert len(core.sparkline(list(range(10_000)), 24)) == 24


def test_list_sparklines_on_request_off_by_default_when_piped_and_never_in_json(ws, run):
    rich_task(ws)
    plain = run("list", "unet")
    assert plain.exit_code == 0 and "▁" not in plain.stdout and "█" not in plain.stdout
    spark = run("list", "unet", "--spark")
    lines = spark.stdout.splitlines()
    assert lines[: len(plain.stdout.splitlines())] == plain.stdout.splitlines()
    loss = next(line for line in lines if line.startswith("val_loss "))
    assert "(best #12: 0.08333, lowest)" in loss and "0.2 → 0.08333" in loss  # #4's NaN is skipped
    assert any(line.startswith("acc ") for line in lines) and any(line.startswith("val_iou ") for line in lines)
    assert run("list", "unet", "--no-spark").stdout == plain.stdout
    js = run("list", "unet", "--spark", "--json")
    assert [r["number"] for r in json.loads(js.stdout)] == list(range(4, 13))


# --- ckpt report ------------------------------------------------------------------------------------------------

OUTSIDE = re.compile(
    r"""(?:\b(?:src|href|action|poster|data|srcset)\s*=\s*["']?(?!data:|#)([^"'\s>]+))"""
    r"""|url\(\s*["']?(?!data:|#)([^)"']+)""",
    re.I,
)


def fetches(page: str) -> list[str]:
    """Every address the page would load (src, href, url(), @import), other than data: URIs and #fragments."""
    found = [a or b for a, b in OUTSIDE.findall(page)]
    found += re.findall(r"@import", page)
    found += re.findall(r"<(?:link|iframe|object|embed|base)\b", page, re.I)
    return found


def test_fetches_catches_outside_addresses():
    assert fetches('<img src="https://x/y.png"><a href="/etc">') == ["https://x/y.png", "/etc"]
    assert fetches("<style>b{background:url(x.png)}</style>") == ["x.png"]
    assert fetches('<img src="data:image/png;base64,AAA"><a href="#cp-1">') == []


def report_of(run: Callable[..., Any], *args: str) -> tuple[dict[str, Any], str]:
    r = run("report", *args, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    return got, Path(got["output"]).read_text(encoding="utf-8")


def test_report_is_self_contained_and_holds_every_checkpoint(ws, run):
    rich_task(ws)
    got, page = report_of(run, "unet")
    assert got["output"] == "report-unet.html" and got["checkpoints"] == 9 and got["trashed"] == 3
    assert fetches(page) == []
    assert re.search(r'<img class="curves"[^>]* src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    assert sorted(int(n) for n in re.findall(r'<tr id="cp-(\d+)"', page)) == list(range(1, 13))
    assert page.count("<tr id=") == 12
    assert "unet-five" in page and "trash 2" in page  # the trash rows name their entry (ids start with the year)
    entry = re.search(r"trash (\d{8}-\d{6}-[0-9a-f]{6})", page)
    assert entry and f"ckpt trash restore {entry.group(1)}" in page
    assert "ckpt promote unet 12" in page  # the best by every metric, not yet a model
    assert "lower is better: the metric&#x27;s name" in page
    assert page.count("<script>") == 1 and "<script src" not in page


def test_report_names_the_workspace_in_its_commands_as_the_user_did(ws, run):
    rich_task(ws)
    _, page = report_of(run, "unet")
    assert "ckpt promote unet 12" in page and "ckpt -w" not in page
    r = run("-w", str(ws.root), "report", "unet", "--out", "w.html")
    assert r.exit_code == 0, r.output
    assert f"ckpt -w {ws.root} promote unet 12" in Path("w.html").read_text()


def test_report_without_out_never_overwrites(ws, run, tmp_path):
    rich_task(ws)
    (tmp_path / "report-unet.html").write_text("mine")
    r = run("report", "unet")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("wrote report-unet-2.html (9 checkpoints, 3 in the trash, 1 model)")
    assert (tmp_path / "report-unet.html").read_text() == "mine"


def test_report_of_a_bucket_workspace(s3_url, run, monkeypatch):
    monkeypatch.setenv("CKPT_WORKSPACE", s3_url)
    ws = ckpt.Workspace.init(s3_url)
    rich_task(ws)
    got, page = report_of(run, "unet", "--out", "bucket.html")
    assert got["checkpoints"] == 9 and got["trashed"] == 3 and got["models"] == ["unet-five"]
    assert fetches(page) == []
    assert sorted(int(n) for n in re.findall(r'<tr id="cp-(\d+)"', page)) == list(range(1, 13))
    assert s3_url in page  # the workspace, in the header


def test_report_with_a_preview_grid(ws, run, tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from ckpt.zoo import UNet

    kwargs = {"in_channels": 3, "classes": 2, "width": 4, "depth": 2}
    t = ws.create_task("seg", arch="ckpt.zoo:UNet", arch_kwargs=kwargs)
    for i in range(1, 4):
        torch.manual_seed(i)
        t.save(UNet(**kwargs).state_dict(), step=i, metrics={"val_iou": i / 10})
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "im" / "a.png")
    Image.new("L", (32, 32), 1).save(tmp_path / "gt" / "a.png")
    got, page = report_of(
        run, "seg", "--preview", "1", "3", "--images", str(tmp_path / "im"), "--masks", str(tmp_path / "gt")
    )
    assert got["preview"] == [1, 3]
    assert re.search(r'<section id="preview"><h2>Preview</h2><img class="preview"[^>]* src="data:image/png', page)
    assert "<th>mIoU</th>" in page and fetches(page) == []
    assert not any(p.name.startswith("preview") for p in ws.root.rglob("*"))  # nothing stored in the workspace


# --- the page in a real browser ---------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI needs it (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def open_headless(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """Load `page` in headless Chromium: the DOM after its scripts ran, and the page's console messages."""
    cmd = [
        chromium(),
        "--headless=new",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_report_opens_in_headless_chromium_without_console_errors(ws, run, tmp_path):
    rich_task(ws)
    got, page = report_of(run, "unet", "--out", "r.html")
    # the page as it is: no console message at all (errors, failed loads, warnings)
    dom, console = open_headless(Path("r.html"), tmp_path)
    assert console == []
    assert 'id="cp-12"' in dom and "Checkpoints (12)" in dom
    # the sorting script at work: sort by val_loss (best first: ascending), NaN and missing last, then descending
    probe = (
        "<script>var th=Array.prototype.filter.call(document.querySelectorAll('table.sortable th'),"
        "function(h){return h.textContent==='val_loss';})[0];th.click();"
        "var ids=function(){return Array.prototype.map.call(document.querySelectorAll('table.sortable tbody tr'),"
        "function(r){return r.id.slice(3);}).join(' ');};document.body.setAttribute('data-asc',ids());th.click();"
        "document.body.setAttribute('data-desc',ids());</script></body>"
    )
    Path("probe.html").write_text(page.replace("</body>", probe), encoding="utf-8")
    dom, console = open_headless(Path("probe.html"), tmp_path)
    assert console == []
    asc = re.search(r'data-asc="([^"]*)"', dom)
    desc = re.search(r'data-desc="([^"]*)"', dom)
    assert asc and desc, dom[:2000]
    assert asc.group(1) == "12 11 10 9 8 7 6 5 3 2 1 4"  # #4's NaN last
    assert desc.group(1) == "1 2 3 5 6 7 8 9 10 11 12 4"
    # a metric better higher sorts best first too: acc descending on the first click
    probe = probe.replace("'val_loss'", "'acc'")
    Path("probe.html").write_text(page.replace("</body>", probe), encoding="utf-8")
    dom, console = open_headless(Path("probe.html"), tmp_path)
    asc = re.search(r'data-asc="([^"]*)"', dom)
    assert console == [] and asc and asc.group(1) == "12 11 10 9 8 7 6 5 4 3 2 1"


def test_headless_check_catches_a_page_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>undefinedFunction();</script>")
    _, console = open_headless(bad, tmp_path)
    assert any("undefinedFunction" in line for line in console)


@pytest.mark.parametrize("command", [["plot", "unet", "--out", "p.png"], ["report", "unet"]])
def test_plot_and_report_do_not_import_torch(ws, tmp_path, command):
    import sys

    rich_task(ws)
    env = {**os.environ, "CKPT_WORKSPACE": str(ws.root), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([sys.executable, "-m", "ckpt", *command], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mods = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib" in mods and "ckpt.plot" in mods
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}


def test_report_names_trash_entries_by_ranges_of_numbers(ws, run):
    t = ws.create_task("r")
    for i in range(1, 11):
        t.save(b"r", step=i, metrics={"loss": 1 / i})
    ws.promote("r", 4, title="r-four")
    trash_unused(ws, "r", KeepRules(keep_last=3))  # trashes 1-3, 5-7
    _, page = report_of(run, "r")
    assert "# back from the trash: 6 checkpoints, #1-3, 5-7" in page


def test_plot_overlay_draws_every_metric_in_one_panel(ws, run_json, tmp_path):
    rich_task(ws)
    got = run_json("plot", "unet", "--overlay", "--out", str(tmp_path / "o.svg"))
    assert got["height"] == 370  # one panel
    m = marks(tmp_path / "o.svg")
    assert m["mark-checkpoint-unet-acc"] == 9 and m["mark-checkpoint-unet-val_loss"] == 8
    assert m["mark-checkpoint-unet-val_iou"] == 6


def test_report_of_a_task_without_checkpoints_or_metrics(ws, run):
    ws.create_task("empty")
    got, page = report_of(run, "empty")
    assert got["checkpoints"] == 0 and "No checkpoint records a metric." in page and fetches(page) == []
    ws.create_task("bare").save(b"b", step=1)
    got, page = report_of(run, "bare")
    assert got["checkpoints"] == 1 and 'id="cp-1"' in page and "<img" not in page


def test_report_escapes_names_from_records(ws, run):
    t = ws.create_task("esc")
    t.save(
        b"e",
        step=1,
        metrics={"a<b>\"c'&_loss": 0.5, "</script><script>alert(1)</script>": 1.0, "rm -rf ~\nval_loss": 0.1},
    )
    t.save(b"e", step=2, metrics={"a<b>\"c'&_loss": 0.4, "rm -rf ~\nval_loss": 1.0})
    _, page = report_of(run, "esc")
    commands = re.search(r"<pre>(.*?)</pre>", page, re.S)
    assert commands and "# the best rm -rf ~\\nval_loss (#1)" in commands.group(1)  # one comment line, not two
    assert not any(line.startswith("val_loss") for line in commands.group(1).splitlines())
    assert "<b>" not in page and "alert(1)</script>" not in page and page.count("<script>") == 1
    assert "a&lt;b&gt;&quot;c&#x27;&amp;_loss" in page


def test_plot_names_with_dollars_are_text_not_math(ws, run_json, tmp_path):
    t = ws.create_task("d")
    for i in range(1, 4):
        t.save(b"d", step=i, metrics={"cost$a^$_loss": 1 / i})
    ws.promote("d", 2, title="m-2")
    got = run_json("plot", "d", "--out", str(tmp_path / "d.png"))
    assert got["metrics"] == ["cost$a^$_loss"] and png_size(tmp_path / "d.png") == (800, 370)


def test_report_sorts_ten_thousand_rows_again_and_again(ws, run, tmp_path):
    # moving 10,000 rows one by one inside the live table took 8-13 s a click after the first; a new tbody
    # swapped in at once takes well under a second. The bound is generous: it catches only the slow way.
    big_task(ws, tmp_path)
    _, page = report_of(run, "big", "--out", "big.html")
    probe = (
        "<script>var th=Array.prototype.filter.call(document.querySelectorAll('table.sortable th'),"
        "function(h){return h.textContent==='#';})[0];var ms=[];"
        "for(var k=0;k<3;k++){var t0=performance.now();th.click();ms.push(performance.now()-t0);}"
        "var rows=document.querySelector('table.sortable').tBodies;"
        "document.body.setAttribute('data-ms',ms.map(Math.round).join(' '));"
        "document.body.setAttribute('data-ends',[rows.length,rows[0].rows.length,rows[0].rows[0].id,"
        "rows[0].rows[9999].id].join(' '));</script></body>"
    )
    Path("probe.html").write_text(page.replace("</body>", probe), encoding="utf-8")
    dom, console = open_headless(Path("probe.html"), tmp_path)
    assert console == []
    ms = re.search(r'data-ms="([^"]*)"', dom)
    ends = re.search(r'data-ends="([^"]*)"', dom)
    assert ms and ends, dom[:2000]
    assert ends.group(1) == "1 10000 cp-1 cp-10000"  # three clicks: ascending, descending, ascending
    assert max(float(v) for v in ms.group(1).split()) < 3000, ms.group(1)


def curve_moves(svg: Path, gid: str) -> list[int]:
    """The number of points of each piece of line (a `M` starts one) in the group `gid` of the SVG."""
    root = ET.fromstring(svg.read_bytes())
    group = next(g for g in root.iter(f"{SVG}g") if g.get("id") == gid)
    d = " ".join(p.get("d", "") for p in group.iter(f"{SVG}path"))
    return [1 + piece.count("L") for piece in d.split("M")[1:]]


def test_plot_a_restart_breaks_the_line_where_the_step_goes_back(ws, run, tmp_path):
    t = ws.create_task("r")
    steps = [0, 100, 200, 300, 400, 500, 300, 400, 500, 600]  # a run restarted from #4 (step 300) at #7
    for i, s in enumerate(steps):
        t.save(b"r", step=s, metrics={"val_loss": 1 / (i + 1)})
    r = run("plot", "r", "--json", "--out", str(tmp_path / "r.svg"))
    assert r.exit_code == 0, r.output
    note = "task 'r' restarted at checkpoint 7: step went from 500 back to 300"
    assert note in json.loads(r.stdout)["notes"] and f"note: {note}" in r.stderr
    # two pieces in the order saved (not one sawtooth sorted by step): #1-#6, then #7-#10
    assert curve_moves(tmp_path / "r.svg", "mark-curve-r-val_loss") == [6, 4]
    assert marks(tmp_path / "r.svg")["mark-checkpoint-r-val_loss"] == 10
    r = run("plot", "r", "--json", "--x", "number", "--out", str(tmp_path / "n.svg"))  # by number: no restart
    assert json.loads(r.stdout)["notes"] == [] and curve_moves(tmp_path / "n.svg", "mark-curve-r-val_loss") == [10]


def test_plot_and_report_ignore_the_users_matplotlib_settings(ws, tmp_path):
    import sys

    t = ws.create_task("rc")
    for i in range(1, 4):
        t.save(b"r", step=i, metrics={"val_loss": 1 / i, "损失_\U0001f600_loss": 2 / i})  # glyphs the font lacks
    # a matplotlibrc here (read first) that would draw with LaTeX at 300 dpi, cropped; a config folder
    # matplotlib cannot write (a file); a backend that does not exist
    (tmp_path / "matplotlibrc").write_text("text.usetex: True\nsavefig.dpi: 300\nsavefig.bbox: tight\n")
    (tmp_path / "not-a-folder").write_text("")
    env = {
        **os.environ,
        "CKPT_WORKSPACE": str(ws.root),
        "MPLCONFIGDIR": str(tmp_path / "not-a-folder"),
        "MPLBACKEND": "bogus",
    }
    for args in (["plot", "rc", "--out", "p.png", "--json"], ["report", "rc", "--out", "r.html"]):
        proc = subprocess.run([sys.executable, "-m", "ckpt", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [line for line in proc.stderr.splitlines() if not line.startswith("note: ")] == [], proc.stderr
        if args[0] == "plot":
            got = json.loads(proc.stdout)
            assert png_size(tmp_path / "p.png") == (got["width"], got["height"]) == (800, 610)


def test_control_characters_in_names_never_reach_the_terminal_raw_and_are_isolated_in_the_page(ws, run, tmp_path):
    t = ws.create_task("cc")
    odd = ["\x1b[31mred", "two\nlines", "\u202eevil"]  # an escape sequence, a newline, RIGHT-TO-LEFT OVERRIDE
    for i in range(1, 4):
        t.save(b"c", step=i, metrics=dict.fromkeys(odd, i / 10))
    raw = ("\x1b", "\u202e")
    r = run("list", "cc", "--spark")
    assert r.exit_code == 0, r.output
    spark = [line for line in r.stdout.splitlines() if "→" in line]
    assert len(spark) == 3 and not any(c in r.stdout for c in raw)
    assert any(line.startswith("\\x1b[31mred") for line in spark) and any("two\\nlines" in line for line in spark)
    assert any(line.startswith("\\u202eevil") for line in spark)
    for args in (["plot", "cc", "--out", "p.png"], ["report", "cc", "--out", "r.html"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
        assert len(notes) == len(r.stderr.splitlines()) == 3  # no direction known: one note per metric, one line each
        assert not any(c in r.stderr for c in raw) and "'\\u202eevil'" in r.stderr
    page = Path("r.html").read_text(encoding="utf-8")
    # as text, U+202E shows only inside <bdi> (in <title> and attribute values it cannot turn the page around)
    text = re.sub(r"<title>.*?</title>|<[^>]*>", "\n", re.sub(r"<bdi>[^<]*</bdi>", "", page), flags=re.S)
    assert "\u202e" in page and "\u202e" not in text
    assert page.count("<bdi>\u202eevil</bdi>") >= 3  # the table's column, the best table, the note


def test_plot_overlay_of_several_tasks_draws_each_metric_in_its_own_line_style(ws, run_json, tmp_path):
    rich_task(ws)
    other = ws.create_task("other")
    for i in range(1, 5):
        other.save(b"o", step=i * 10, metrics={"val_loss": 2 / i, "acc": i / 4})
    run_json("plot", "unet", "other", "-m", "acc", "-m", "val_loss", "--overlay", "--out", str(tmp_path / "o.svg"))
    root = ET.fromstring((tmp_path / "o.svg").read_bytes())

    def style(gid: str) -> tuple[str, str]:  # the curve's (stroke colour, dashes)
        group = next(g for g in root.iter(f"{SVG}g") if g.get("id") == gid)
        css = next(group.iter(f"{SVG}path")).get("style", "")
        colour = re.search(r"stroke: ?(#[0-9a-f]+)", css)
        dashes = re.search(r"stroke-dasharray: ?([^;]+)", css)
        return (colour.group(1) if colour else "", dashes.group(1) if dashes else "solid")

    styles = {(t, m): style(f"mark-curve-{t}-{m}") for t in ("unet", "other") for m in ("acc", "val_loss")}
    assert len(set(styles.values())) == 4  # four legend entries, four looks
    assert styles["unet", "acc"][0] == styles["unet", "val_loss"][0]  # a colour per task
    assert styles["unet", "acc"][1] == styles["other", "acc"][1]  # a line style per metric


def test_plot_with_plan_says_which_would_be_trashed_that_a_panel_cannot_show(ws, run_json, tmp_path):
    rich_task(ws)  # val_iou only from #7 on; val_loss NaN at #4
    got = run_json(
        "plot", "unet", "-m", "val_iou", "-m", "val_loss", "--keep-last", "2", "--out", str(tmp_path / "p.svg")
    )
    assert got["tasks"][0]["would_trash"] == [4, 6, 7, 8, 9, 10]
    m = marks(tmp_path / "p.svg")
    assert m["mark-plan_trash-unet-val_iou"] == 4 and m["mark-plan_trash-unet-val_loss"] == 5
    assert (
        "task 'unet': 2 checkpoint(s) that trash-unused would trash have no val_iou (or no step), "
        "so the 'val_iou' panel cannot show them: #4, #6" in got["notes"]
    )
    assert any(n.startswith("task 'unet': 1 checkpoint(s)") and n.endswith(": #4") for n in got["notes"])


def test_hints_name_only_options_the_command_has(ws, run, tmp_path):
    t = ws.create_task("u")
    for i in range(1, 4):
        t.save(b"u", step=i, metrics={"score": i})
    for args in (["plot", "u", "--out", "u.svg"], ["report", "u", "--out", "u.html"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert "no best marked for 'score'" in r.stderr and "--min" not in r.stderr and "--max" not in r.stderr
        assert '[metrics] score = "min" (or "max")' in r.stderr
    page = Path("u.html").read_text(encoding="utf-8")
    assert "--min" not in page and "direction unknown: set it once" in page


def test_report_preview_takes_arch_as_the_hint_says(ws, run, tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from ckpt.zoo import UNet

    kwargs = {"in_channels": 3, "classes": 2, "width": 4, "depth": 2}
    t = ws.create_task("bare")  # records no architecture
    torch.manual_seed(0)
    t.save(UNet(**kwargs).state_dict(), step=1, metrics={"val_iou": 0.1})
    (tmp_path / "im").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "im" / "a.png")
    r = run("report", "bare", "--preview", "1", "--images", "im")
    assert r.exit_code == 2 and "records no architecture" in r.stderr and "--arch" in r.stderr
    got, page = report_of(
        run, "bare", "--preview", "1", "--images", "im", "--arch", "ckpt.zoo:UNet", "--arch-kwargs", json.dumps(kwargs)
    )
    assert got["preview"] == [1] and '<section id="preview">' in page
    r = run("report", "bare", "--arch", "ckpt.zoo:UNet")
    assert r.exit_code == 2 and "go with --preview" in r.stderr


def test_plot_svg_ids_are_unique_when_names_give_the_same_id(ws, run_json, tmp_path):
    t = ws.create_task("v")
    names = ["val loss", "val_loss", "val/loss", "val_loss-2"]  # the first three give one id ("-" becomes "_")
    for i in range(1, 4):
        t.save(b"v", step=i, metrics=dict.fromkeys(names, 1 / i))
    run_json("plot", "v", "--out", str(tmp_path / "v.svg"))
    ids = [e.get("id") for e in ET.fromstring((tmp_path / "v.svg").read_bytes()).iter() if e.get("id")]
    assert len(ids) == len(set(ids))
    m = marks(tmp_path / "v.svg")
    checkpoints = sorted(k for k in m if k.startswith("mark-checkpoint-"))
    assert len(checkpoints) == 4 and all(m[k] == 3 for k in checkpoints)
    assert core.mark_suffixes([("v", n) for n in sorted(names)]) == {
        ("v", "val loss"): "",
        ("v", "val/loss"): "-2",
        ("v", "val_loss"): "-3",
        ("v", "val_loss-2"): "",
    }


def test_report_commands_for_a_task_named_like_an_option_work(ws, run):
    t = ws.create_task("-rf")
    for i in range(1, 4):
        t.save(b"r", step=i, metrics={"val_loss": 1 / i})
    ws.create_task("ok").save(b"o", step=1, metrics={"val_loss": 1.0})
    r = run("report", "--out", "rf.html", "--", "-rf")
    assert r.exit_code == 0, r.output
    page = Path("rf.html").read_text(encoding="utf-8")
    commands = re.search(r"<pre>(.*?)</pre>", page, re.S)
    assert commands
    lines = [html.unescape(line) for line in commands.group(1).splitlines() if line.startswith("ckpt ")]
    assert "ckpt promote -- -rf 3" in lines and "ckpt trash-unused --dry-run -- -rf" in lines
    for line in lines:  # each runs as written
        r = run(*shlex.split(line)[1:])
        assert r.exit_code == 0, (line, r.output)
    assert ws.models_of("-rf") == {3: ["-rf-3"]}
    _, page = report_of(run, "ok")
    assert "ckpt promote ok 1" in page and "ckpt trash-unused --dry-run ok" in page and " -- " not in page


@pytest.mark.parametrize("command", ["plot", "report"])
def test_out_refuses_urls_and_names_the_file_it_cannot_write(ws, run, monkeypatch, command):
    rich_task(ws)
    ext = "png" if command == "plot" else "html"
    r = run(command, "unet", "--out", f"s3://bkt/out.{ext}")
    assert r.exit_code == 2 and f"not a URL ('s3://bkt/out.{ext}')" in r.stderr and "does not exist" not in r.stderr
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux's /sys, where no one may create a file")
    r = run(command, "unet", "--out", f"/sys/a.{ext}")
    assert r.exit_code == 1 and r.stderr.startswith(f"error: cannot write '/sys/a.{ext}': ")
    assert "doctor" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.chdir("/sys")  # without --out: a new file here, which /sys refuses too
    r = run(command, "unet")
    assert r.exit_code == 1 and f"cannot write '{command}-unet.{ext}'" in r.stderr and "doctor" not in r.stderr


def test_plan_without_keep_flags_is_the_task_policy(ws, run_json, tmp_path):
    task = ws.create_task("pol")
    for i in range(12):
        task.save(b"w", step=i, metrics={"loss": 1.0 / (i + 1)})
    run_json("policy", "set", "pol", "--keep-last", "5")
    planned = run_json("trash-unused", "pol", "--dry-run")["trashed"]
    res = run_json("plot", "pol", "--with-plan", "--out", str(tmp_path / "p.svg"))
    assert res["tasks"][0]["would_trash"] == planned == [1, 2, 3, 4, 5, 6, 7]


def test_names_with_control_characters_and_huge_values_still_draw(ws, run, run_json, tmp_path):
    import xml.etree.ElementTree as ET

    task = ws.create_task("odd")
    name = "x\x1b[31m\u202eevil\nloss"
    for i, v in enumerate([1e308, -1e308, 1.7e308, 0.5, 0.25]):
        task.save(b"w", step=i, metrics={name: v, "ok": float(i)})
    out = tmp_path / "odd.svg"
    res = run("plot", "odd", "--out", str(out))
    assert res.exit_code == 0, res.output
    ET.parse(out)  # well-formed: no raw control character in the file
    assert "beyond ±1e300 is not drawn: #1, #2, #3" in res.stderr
    assert "Warning" not in res.stderr
    listed = run("list", "odd", "--spark")
    assert listed.exit_code == 0, listed.output
    rep = run("report", "odd", "--out", str(tmp_path / "odd.html"))
    assert rep.exit_code == 0, rep.output
