"""ckpt preview, ckpt demo, examples/train_unet.py, and safe loading: real torch on a tiny UNet."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ckpt
from ckpt.loading import StateDictMismatch, fit_state_dict
from ckpt.picture import layout
from ckpt.zoo import UNet

ROOT = Path(__file__).resolve().parent.parent
KWARGS = {"in_channels": 3, "classes": 3, "width": 4, "depth": 2}


def _sample(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    image = (rng.random((size, size, 3)) * 80).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for kind in (1, 2):
        x, y = rng.integers(2, size - 12, 2)
        mask[y : y + 10, x : x + 10] = kind
        image[y : y + 10, x : x + 10] = (250, 40, 40) if kind == 1 else (40, 40, 250)
    return image, mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A workspace with task 'tiny' (two checkpoints of a UNet trained a few steps), two images and masks."""
    root = tmp_path_factory.mktemp("preview")
    ws = ckpt.Workspace.init(root / "ws")
    task = ws.create_task("tiny", arch="ckpt.zoo:UNet", arch_kwargs=KWARGS, settings={"preview": {"mean": 0.2}})
    rng = np.random.default_rng(0)
    data = [_sample(rng) for _ in range(8)]
    x = torch.from_numpy(np.stack([d[0] for d in data])).permute(0, 3, 1, 2).float() / 255 - 0.2
    y = torch.from_numpy(np.stack([d[1] for d in data])).long()
    torch.manual_seed(0)
    model = UNet(**KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(1, 7):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 3 == 0:
            task.save(model.state_dict(), step=step, metrics={"loss": loss.item()})
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (im, m) in enumerate(data[:2]):
        Image.fromarray(im).save(images / f"im{i}.png")
        Image.fromarray(m).save(masks / f"im{i}.png")
    return {"ws": ws, "root": root, "images": images, "masks": masks, "state": model.state_dict()}


@pytest.fixture
def preview(run: Callable[..., Any], trained: dict[str, Any]) -> Callable[..., Any]:
    def invoke(*args: str) -> Any:
        return run("-w", str(trained["ws"].root), "preview", *args)

    return invoke


def _args(trained: dict[str, Any], out: Path) -> list[str]:
    return ["--images", str(trained["images"]), "--masks", str(trained["masks"]), "--out", str(out)]


def test_preview_two_checkpoints_writes_grid_and_metrics(preview, trained, tmp_path):
    out = tmp_path / "grid.png"
    result = preview("tiny", "1", "2", *_args(trained, out), "--save-masks", str(tmp_path / "pred"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"output", "images", "checkpoints"} <= set(data)
    assert data["output"] == str(out)
    assert [c["number"] for c in data["checkpoints"]] == [1, 2]
    for c in data["checkpoints"]:
        assert 0 <= c["miou"] <= 1 and 0 <= c["dice"] <= 1 and len(c["image_miou"]) == 2
    # 2 rows; columns: input, ground truth, two checkpoints; 3 classes in the legend
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == layout(2, 4, 3, 160) == tuple(data["size"])
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "pred").rglob("*.png"))
    assert saved == ["pred/tiny-1/im0.png", "pred/tiny-1/im1.png", "pred/tiny-2/im0.png", "pred/tiny-2/im1.png"]
    table = preview("tiny", "1", "2", *_args(trained, tmp_path / "t.png"))
    assert table.exit_code == 0 and "mIoU" in table.stdout and "wrote" in table.stdout


def test_preview_models_and_without_masks(run, preview, trained, tmp_path):
    ws = trained["ws"]
    if "tiny-two" not in ws.models:
        ws.promote("tiny", 2, title="tiny-two")
    out = tmp_path / "m.png"
    result = preview("--model", "tiny-two", "--images", str(trained["images"] / "im0.png"), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["checkpoints"][0]["model"] == "tiny-two" and data["checkpoints"][0]["miou"] is None
    with Image.open(out) as im:
        assert im.size == layout(1, 2, 3, 160)


def test_wrong_architecture_or_kwargs_is_a_usage_error(preview, trained, tmp_path):
    args = _args(trained, tmp_path / "x.png")
    cases = {
        ("--arch", "ckpt.zoo:NoSuchNet"): "has no 'NoSuchNet'",
        ("--arch", "no_such_module_xyz:Net"): "cannot import module 'no_such_module_xyz'",
        ("--arch-kwargs", '{"classes": 3, "widht": 4}'): "unexpected keyword argument 'widht'",
        ("--arch-kwargs", '{"classes": 3, "width": 8, "depth": 2}'): "does not fit the network",
        ("--arch-kwargs", '{"classes": 3, "width": 4, "depth": 1}'): "unexpected (",
        ("--arch-kwargs", "[1]"): "must be a JSON object",
    }
    for extra, message in cases.items():
        result = preview("tiny", "1", *args, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def tiny_unet(**kwargs: Any) -> torch.nn.Module:
    """A factory function, as torchvision's model builders are."""
    return UNet(**{**KWARGS, **kwargs})


def test_factory_function_named_on_the_command_line(preview, trained, tmp_path):
    result = preview("tiny", "2", *_args(trained, tmp_path / "f.png"), "--arch", f"{__name__}:tiny_unet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoints"][0]["miou"] is not None


def test_manifest_naming_a_function_is_refused(run, ws, trained, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    task = ws.create_task("evil-arch", arch="os:system", arch_kwargs={"command": f"touch {marker}"})
    task.save(trained["state"])
    result = run("preview", "evil-arch", "1", *_args(trained, tmp_path / "x.png"))
    assert result.exit_code == 6, result.output
    assert "package 'os', which is not trusted" in result.stderr
    monkeypatch.setenv("CKPT_TRUSTED_ARCH", "os")  # even from a trusted package, a function is not called
    result = run("preview", "evil-arch", "1", *_args(trained, tmp_path / "x.png"))
    assert result.exit_code == 6, result.output
    assert "not a torch.nn.Module class" in result.stderr
    assert not marker.exists()


def test_missing_images_and_masks_are_not_found(preview, trained, tmp_path):
    result = preview("tiny", "1", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 3 and "does not exist" in result.stderr
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "im0.png").write_bytes((trained["masks"] / "im0.png").read_bytes())
    result = preview("tiny", "1", "--images", str(trained["images"]), "--masks", str(masks))
    assert result.exit_code == 3, result.output
    assert "image 'im1.png' has no mask" in result.stderr
    result = preview("tiny", "1", "--masks", str(masks))
    assert result.exit_code == 2 and "--images" in result.stderr
    result = preview("tiny", "1", "--images", str(trained["images"]), "--out", str(tmp_path / "x.jpg"))
    assert result.exit_code == 2 and "must end in .png" in result.stderr
    result = preview("tiny", "9", "--images", str(trained["images"]))
    assert result.exit_code == 3 and "has no checkpoint 9" in result.stderr


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(run, ws, trained, tmp_path):
    marker = tmp_path / "pwned"
    task = ws.create_task("evil", arch="ckpt.zoo:UNet", arch_kwargs=KWARGS)
    state = dict(trained["state"])
    state["payload"] = _RunsACommand(marker)  # type: ignore[assignment]
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    task.save_file(evil)
    result = run("preview", "evil", "1", *_args(trained, tmp_path / "x.png"))
    assert result.exit_code == 6, result.output
    assert "needs full unpickling" in result.stderr and "system" in result.stderr and "--unsafe-load" in result.stderr
    assert not marker.exists()


def test_unsafe_load_opens_a_file_that_needs_it(run, ws, trained, tmp_path):
    task = ws.create_task("old", arch="ckpt.zoo:UNet", arch_kwargs=KWARGS)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": trained["state"], "hparams": argparse.Namespace(lr=0.1)}, path)
    task.save_file(path)
    args = _args(trained, tmp_path / "x.png")
    refused = run("preview", "old", "1", *args)
    assert refused.exit_code == 6 and "argparse.Namespace" in refused.stderr
    allowed = run("preview", "old", "1", *args, "--unsafe-load", "--json")
    assert allowed.exit_code == 0, allowed.output


def test_lightning_and_dataparallel_checkpoints_load(run, ws, trained, tmp_path):
    state = trained["state"]
    task = ws.create_task("wrapped", arch="ckpt.zoo:UNet", arch_kwargs=KWARGS, settings={"preview": {"mean": 0.2}})
    task.save(state)
    task.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1, "global_step": 6})
    task.save({f"module.{k}": v for k, v in state.items()})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    task.save_file(tmp_path / "w.safetensors")
    result = run("preview", "wrapped", *_args(trained, tmp_path / "x.png"), "--json")
    assert result.exit_code == 0, result.output
    mious = [c["miou"] for c in json.loads(result.stdout)["checkpoints"]]
    assert len(mious) == 4 and len(set(mious)) == 1


def test_fused_network_predicts_the_same(trained):
    from ckpt.inference import fuse_for_inference

    net = UNet(**KWARGS)
    net.load_state_dict(trained["state"])
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-4)


def test_fused_network_follows_each_new_state_dict(trained):
    from ckpt.inference import FusedNetwork

    net = UNet(**KWARGS).eval()
    net.load_state_dict(trained["state"])
    fused = FusedNetwork(net)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    other = UNet(**KWARGS)
    with torch.no_grad():  # batch-norm statistics that differ from the trained ones
        for m in other.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    for state in (other.state_dict(), trained["state"]):
        net.load_state_dict(state)
        with torch.inference_mode():
            torch.testing.assert_close(fused.refresh()(x), net(x), rtol=1e-4, atol=1e-4)


def test_fit_state_dict_lists_missing_and_unexpected_keys():
    expected = {"a.weight": (2,), "b.weight": (3,)}
    state = {"model.a.weight": torch.zeros(2), "model.b.weight": torch.zeros(3), "loss.weight": torch.zeros(1)}
    assert set(fit_state_dict(state, expected)) == set(expected)
    with pytest.raises(StateDictMismatch) as e:
        fit_state_dict({"a.weight": torch.zeros(4), "c.bias": torch.zeros(1)}, expected)
    assert e.value.missing == ["b.weight"] and e.value.unexpected == ["c.bias"]
    assert e.value.mismatched == ["a.weight (file (4,), network (2,))"] and e.value.exit_code == 2


def test_old_torch_is_refused(preview, trained, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    result = preview("tiny", "1", *_args(trained, tmp_path / "x.png"))
    assert result.exit_code == 1 and "too old" in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom ckpt.cli import app\n"
        "for args in (['--help'], ['preview', '--help'], ['demo', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "print('torch' in sys.modules, 'ckpt.zoo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_example_train_unet_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_unet.py"), str(tmp_path / "ex"), "--epochs", "2"]
        + ["--train-size", "16", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ws = ckpt.Workspace.open(tmp_path / "ex")
    task = ws.task("unet-shapes")
    assert task.status == "finished" and [cp.number for cp in task.checkpoints] == [1, 2]
    assert set(task.checkpoints[0].metrics) == {"train_loss", "val_miou", "val_dice"}
    names = sorted(p.name for p in (tmp_path / "ex" / "demo-data" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ex" / "demo-data" / "masks").iterdir()) and names
    assert "held-out images:" in done.stdout


def test_demo_quick(run, tmp_path):
    # the full demo (10 epochs, about a minute) is test_full_demo_improves below, run with CKPT_FULL_DEMO=1
    result = run("demo", str(tmp_path / "demo"), "--epochs", "2", "--train-size", "16", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [c["number"] for c in data["checkpoints"]] == [1, 2]
    assert Path(data["output"]).is_file() and data["task"] == "unet-shapes"
    again = run("demo", str(tmp_path / "demo"), "--epochs", "2", "--train-size", "16")
    assert again.exit_code == 4 and "not empty" in again.stderr


@pytest.mark.skipif(not os.environ.get("CKPT_FULL_DEMO"), reason="about a minute: set CKPT_FULL_DEMO=1")
def test_full_demo_improves(run, tmp_path):
    result = run("demo", str(tmp_path / "demo"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    miou = {c["number"]: c["miou"] for c in data["checkpoints"]}
    assert miou[10] > miou[7] > miou[3], miou


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_freed_memory_is_kept_only_while_inferring_on_the_cpu(monkeypatch):
    from ckpt import inference

    libc = _FakeLibc()
    monkeypatch.setattr(inference, "_glibc", lambda: libc)
    with inference.reuse_freed_memory(torch.device("meta")):
        pass
    assert libc.calls == []
    with pytest.raises(RuntimeError), inference.reuse_freed_memory(torch.device("cpu")):
        assert [c[1] for c in libc.calls] == [inference._M_MMAP_THRESHOLD, inference._M_TRIM_THRESHOLD]
        raise RuntimeError("inference failed")
    # restored on the way out, even after an error, and the free memory given back
    assert libc.calls[2:] == [
        ("mallopt", inference._M_MMAP_THRESHOLD, 32 * 2**20),
        ("mallopt", inference._M_TRIM_THRESHOLD, 64 * 2**20),
        ("malloc_trim", 0),
    ]


def test_freed_activations_are_reused_without_page_faults():
    from ckpt import inference

    if inference._glibc() is None:
        pytest.skip("glibc only")
    # in a fresh process, as `ckpt preview` runs: the heap's layout depends on everything run before.
    # A network's forward passes, as preview makes them: activations of 64 MiB, above glibc's largest
    # mmap threshold (32 MiB), several alive at once. (One block of a fixed size allocated and freed in
    # a loop is no model of this: torch's aligned allocation leaves a small cached chunk after the freed
    # block, which then never fits the next request, and the heap grows by a block each time.)
    code = """
import resource, torch
from ckpt import inference

torch.manual_seed(0)
conv = lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1)
net = torch.nn.Sequential(conv(8, 32), torch.nn.ReLU(), conv(32, 32), torch.nn.ReLU(), conv(32, 4)).eval()
x = torch.randn(8, 8, 256, 256)

def faults_of_a_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        net(x).argmax(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = [faults_of_a_pass() for _ in range(3)]
with inference.reuse_freed_memory(torch.device("cpu")):
    inside = [faults_of_a_pass() for _ in range(6)]
after = [faults_of_a_pass() for _ in range(2)]
print(min(outside), sorted(inside[1:])[2], min(after))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    outside, inside, after = map(int, done.stdout.split())
    # outside, each activation is a fresh mapping, faulted in again (about 16,384 pages of 4 KiB each);
    # inside, after the first pass has grown the heap, the passes reuse it (the median of the later ones)
    assert inside < outside / 20, done.stdout
    # and on the way out, glibc's own thresholds are back: large blocks are mappings again
    assert after > outside / 2, done.stdout


def test_conv_relu_in_one_call_gives_the_same_values(trained):
    from ckpt.inference import ConvReLU, FusedNetwork, _cpu_conv_relu

    if _cpu_conv_relu() is None:
        pytest.skip("this torch has no oneDNN convolution with a ReLU")
    net = UNet(**KWARGS).eval()
    net.load_state_dict(trained["state"])
    fused = FusedNetwork(net).refresh()
    assert sum(isinstance(m, ConvReLU) for m in fused.modules()) == 10  # two per block, five blocks
    assert not any(isinstance(m, torch.nn.ReLU) for m in fused.modules())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = fused(x)
    with torch.inference_mode():
        plain = _without_conv_relu(fused)(x)
    assert torch.equal(got, plain)
    # with autograd recording (no backward in oneDNN's call) the eager path runs
    assert fused(x).requires_grad


def _without_conv_relu(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    from ckpt.inference import ConvReLU

    out = copy.deepcopy(net)
    for mod in out.modules():
        if isinstance(mod, torch.nn.Sequential):
            for i, m in enumerate(mod):
                if isinstance(m, ConvReLU):
                    mod[i] = torch.nn.Sequential(m.conv, torch.nn.ReLU())
    return out


def test_conv_relu_falls_back_to_eager_when_onednn_fails(trained, monkeypatch):
    from ckpt import inference

    net = UNet(**KWARGS).eval()
    net.load_state_dict(trained["state"])
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = net(x)
    calls = []

    def failing(*args: Any) -> torch.Tensor:
        calls.append(len(args))
        raise RuntimeError("oneDNN cannot run this convolution")

    monkeypatch.setattr(inference, "_cpu_conv_relu", lambda: failing)
    fused = inference.FusedNetwork(net).refresh()
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        fused(x)
    assert len(calls) == 10  # each ConvReLU tried once, then stayed on the eager path
    # and a torch without the fused call keeps the plain ReLUs
    monkeypatch.setattr(inference, "_cpu_conv_relu", lambda: None)
    plain = inference.FusedNetwork(net).refresh()
    assert not any(isinstance(m, inference.ConvReLU) for m in plain.modules())
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-4)
