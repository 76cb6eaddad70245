"""ckpt preview --precision: fp32 masks, bf16 where the CPU computes it, the agreement check and its fallback.

Small networks with fixed weights; nothing is trained here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ckpt
from ckpt import inference, picture, preview
from ckpt.zoo import UNet

KWARGS = {"in_channels": 3, "classes": 3, "width": 4, "depth": 2}
HAS_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _unet_state() -> dict[str, torch.Tensor]:
    """A UNet with random (seeded) weights and batch-norm statistics, so that folding them matters."""
    torch.manual_seed(0)
    net = UNet(**KWARGS)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.state_dict()


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(autouse=True)
def _trust_the_test_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nets here live in `tests`: trusted as a user trusts their own package (docs/preview.md)."""
    monkeypatch.setenv("CKPT_TRUSTED_ARCH", "tests")


@pytest.fixture
def unet_ws(ws: ckpt.Workspace, tmp_path: Path) -> dict[str, Any]:
    task = ws.create_task("u", arch="ckpt.zoo:UNet", arch_kwargs=KWARGS, settings={"preview": {"mean": 0.5}})
    state = _unet_state()
    task.save(state)
    images = _images(tmp_path / "images", [(32, 32), (32, 32), (40, 24)])
    return {"ws": ws, "state": state, "images": images}


class TieNet(torch.nn.Module):
    """Two classes whose logits differ by 0.1 % of the red channel: in bf16 (8 bits of mantissa) they tie.

    Class 1 wins every pixel in float32; in bf16 the weight 1.001 rounds to 1.0, the logits are equal and
    argmax takes the first, class 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def _tie_state() -> dict[str, torch.Tensor]:
    w = torch.zeros(2, 3, 1, 1)
    w[0, 0], w[1, 0] = 1.0, 1.001
    return {"head.weight": w}


class RefusesBf16(TieNet):
    """A network with an operation that has no bf16 kernel (as some third-party ones do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        if out.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this operation")
        return out


class NumpyInside(TieNet):
    """A network whose forward goes through numpy, which has no bf16: a TypeError, not a RuntimeError."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        if out.dtype == torch.bfloat16:
            raise TypeError("Got unsupported ScalarType BFloat16")
        return out


@pytest.fixture
def tie_ws(ws: ckpt.Workspace, tmp_path: Path) -> dict[str, Any]:
    for name, cls in (("tie", TieNet), ("refuses", RefusesBf16), ("numpy-inside", NumpyInside)):
        ws.create_task(name, arch=f"{__name__}:{cls.__name__}").save(_tie_state())
    folder = tmp_path / "red"
    folder.mkdir()
    for i in range(3):  # red channel 128..255: positive logits, class 1 ahead by 0.1 %
        im = np.zeros((16, 16, 3), np.uint8)
        im[..., 0] = 128 + 40 * i
        Image.fromarray(im).save(folder / f"r{i}.png")
    return {"ws": ws, "images": folder}


@pytest.fixture
def bf16_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let auto and --precision bf16 choose bf16 on any CPU: torch computes it (slowly) where it is not native."""
    monkeypatch.setattr(inference, "hardware_lacks", lambda device, precision: None)


def _masks(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_fp32_gives_the_masks_of_a_plain_fp32_forward(run, unet_ws, tmp_path):
    args = ["--images", str(unet_ws["images"]), "--out", str(tmp_path / "p.png"), "--save-masks", str(tmp_path / "m")]
    result = run("preview", "u", "1", *args, "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["precision"] == "fp32"
    assert data["checkpoints"][0]["precision"] == "fp32" and data["checkpoints"][0]["agreement"] is None
    got = _masks(tmp_path / "m" / "u-1")
    net = UNet(**KWARGS).eval()
    net.load_state_dict(unet_ws["state"])
    decided = 0
    for mask, path in zip(got, sorted(unet_ws["images"].glob("*.png")), strict=True):
        x = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)[None] - 0.5
        with torch.no_grad():
            logits = net(x)[0]
        top2 = logits.topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-4).numpy()  # the folded batch norms are not bit-identical
        expected = logits.argmax(0).numpy()
        assert mask.shape == expected.shape
        assert np.array_equal(mask[clear], expected[clear])
        decided += int(clear.sum())
    assert decided > 0.99 * sum(m.size for m in got)


def test_reduced_precision_runs_its_convolutions_in_it(unet_ws, bf16_everywhere, tmp_path):
    class Convolutions(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: list[torch.dtype] = []
            self.fused: list[torch.dtype] = []  # those run as one oneDNN call with their ReLU

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if "conv" in func.__name__:
                self.dtypes.append(args[0].dtype)
                if "pointwise" in func.__name__:
                    self.fused.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    sources = preview.task_sources(unet_ws["ws"], "u", [1])
    for precision in ("fp32", "bf16"):
        options = preview.PreviewOptions(
            images=[unet_ws["images"]], out=tmp_path / f"{precision}.png", precision=precision
        )
        with Convolutions() as seen:
            result = preview.run_preview(sources, options)
        assert result.precision == precision
        counts = {dtype: seen.dtypes.count(dtype) for dtype in set(seen.dtypes)}
        # two batches in either: the two 32×32 images (checked under bf16), then the 40×24 one
        per_batch = sum(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in UNet(**KWARGS).modules())
        if precision == "fp32":
            assert counts == {torch.float32: 2 * per_batch}
        else:  # float32 only for the check of the first two images; bf16 for them and for the rest
            assert counts == {torch.float32: per_batch, torch.bfloat16: 2 * per_batch}
            if inference._cpu_conv_relu() is not None:  # the ReLU still fused in bf16: 10 a forward
                assert seen.fused.count(torch.bfloat16) == 20
            assert 0.9 <= result.checkpoints[0].agreement <= 1  # type: ignore[operator]


def test_conv_relu_computes_in_autocasts_precision():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    fused = inference.ConvReLU(conv)
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.bfloat16
    with torch.inference_mode():
        torch.testing.assert_close(out.float(), torch.relu(conv(x)), rtol=0.05, atol=0.05)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AVX512-BF16 nor AMX")
def test_auto_on_a_bf16_cpu_computes_in_bf16_and_reports_its_agreement(run, unet_ws, tmp_path):
    result = run("preview", "u", "1", "--images", str(unet_ws["images"]), "--out", str(tmp_path / "p.png"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["precision"] == "bf16"
    c = data["checkpoints"][0]
    assert c["precision"] == "bf16" and inference.MIN_AGREEMENT <= c["agreement"] <= 1
    assert result.stderr == ""
    table = run("preview", "u", "1", "--images", str(unet_ws["images"]), "--out", str(tmp_path / "p.png"))
    assert table.exit_code == 0 and "precision bf16" in table.stdout


def test_disagreeing_network_falls_back_to_fp32_with_a_message(run, tie_ws, bf16_everywhere, tmp_path):
    args = ["--images", str(tie_ws["images"]), "--out", str(tmp_path / "p.png"), "--json"]
    result = run("preview", "tie", "1", *args, "--save-masks", str(tmp_path / "auto"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["precision"] == "bf16"
    assert data["checkpoints"][0]["precision"] == "fp32" and data["checkpoints"][0]["agreement"] == 0.0
    assert "#1: in bf16 0 % of the pixels of its first 2 image(s) agree with fp32" in result.stderr
    assert "computed in fp32" in result.stderr
    assert all((m == 1).all() for m in _masks(tmp_path / "auto" / "tie-1"))  # fp32's masks, all three
    # asked for bf16 explicitly: it is kept, with the same warning
    kept = run("preview", "tie", "1", *args, "--precision", "bf16", "--save-masks", str(tmp_path / "bf16"))
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["checkpoints"][0]["precision"] == "bf16"
    assert "kept bf16 as asked" in kept.stderr
    assert all((m == 0).all() for m in _masks(tmp_path / "bf16" / "tie-1"))


@pytest.mark.parametrize(
    ("task", "why"),
    [("refuses", "no bf16 kernel for this operation"), ("numpy-inside", "Got unsupported ScalarType BFloat16")],
)
def test_network_failing_in_bf16_falls_back_under_auto_and_fails_when_asked(
    run, tie_ws, bf16_everywhere, tmp_path, task, why
):
    args = ["--images", str(tie_ws["images"]), "--out", str(tmp_path / "p.png"), "--json"]
    result = run("preview", task, "1", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoints"][0]["precision"] == "fp32"
    assert f"bf16 failed ({why}); computed in fp32" in result.stderr
    asked = run("preview", task, "1", *args, "--precision", "bf16")
    assert asked.exit_code == 2
    assert f"cannot run in bf16 here: {why}" in asked.stderr and "Traceback" not in asked.output


def test_a_precision_the_hardware_lacks_is_exit_2_naming_it(run, tie_ws, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    args = ["--images", str(tie_ws["images"]), "--out", str(tmp_path / "p.png")]
    for precision, lacks in (("bf16", "neither AVX512-BF16 nor AMX"), ("fp16", "no AMX-FP16")):
        result = run("preview", "tie", "1", *args, "--precision", precision)
        assert result.exit_code == 2, result.output
        assert f"--precision {precision}: this CPU has no {precision} arithmetic ({lacks})" in result.stderr
    assert run("preview", "tie", "1", *args, "--precision", "fp64").exit_code == 2
    assert not (tmp_path / "p.png").exists()
    # auto computes in fp32 there, without a check
    result = run("preview", "tie", "1", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["precision"] == "fp32" and data["checkpoints"][0]["agreement"] is None


def test_precision_in_the_legend_line():
    def result(label: str, precision: str, agreement: float | None) -> preview.CheckpointResult:
        return preview.CheckpointResult(label, 1, None, "t", Path("x"), None, None, [], precision, agreement)

    assert picture.precision_note([result("#1", "fp32", None)], "fp32") == "precision fp32"
    both = [result("#3", "bf16", 0.99931), result("#7", "bf16", 0.9999), result("#10", "fp32", 0.98)]
    assert (
        picture.precision_note(both, "bf16")
        == "precision bf16 (agrees with fp32: 99.93 %); #10 fp32 (bf16 agreed 98 %)"
    )
    # the first (or only) checkpoint falling back does not make fp32 the headline
    fell_back = [result("#1", "fp32", 0.9421), result("#2", "bf16", 0.9973)]
    assert (
        picture.precision_note(fell_back, "bf16")
        == "precision bf16 (agrees with fp32: 99.73 %); #1 fp32 (bf16 agreed 94.21 %)"
    )
    assert picture.precision_note(fell_back[:1], "bf16") == "precision bf16; #1 fp32 (bf16 agreed 94.21 %)"
    assert [picture.percent(v) for v in (1.0, 0.99996, 0.995, 0.0)] == ["100 %", "99.99 %", "99.5 %", "0 %"]


def test_preview_bounds_and_non_regular_images(tmp_path: Path) -> None:
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.errors.NotRegularFile):
        picture.collect_images([fifo])
    masks = tmp_path / "masks"
    masks.mkdir()
    os.mkfifo(masks / "x.png")
    with pytest.raises(ckpt.errors.NotRegularFile):
        picture.match_masks([tmp_path / "x.png"], masks)
    for cell, size in [(100_000, None), (160, (60_000, 60_000))]:
        options = preview.PreviewOptions(images=[fifo], cell=cell, size=size)
        with pytest.raises(ckpt.UsageError):
            preview.run_preview([object()], options)  # type: ignore[list-item]
