"""The package list in pyproject.toml is explicit (examples/ ships as ckpt._examples): it must name every package."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "ckpt").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"ckpt._examples"} == set(config["packages"])
    assert config["package-dir"] == {"ckpt._examples": "examples"}
    assert (ROOT / "examples" / "__init__.py").is_file() and (ROOT / "examples" / "train_unet.py").is_file()
