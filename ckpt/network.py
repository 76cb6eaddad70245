"""Building the network a preview runs: a trusted "package.module:factory", called with its keyword arguments."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UnsafeFileError, UsageError


class ArchitectureError(UsageError):
    """The network could not be built: a bad 'module:factory', a missing module, or wrong keyword arguments."""


DEFAULT_TRUSTED_ARCH = ("ckpt.zoo",)
TRUST_ENV = "CKPT_TRUSTED_ARCH"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def user_config_path() -> Path:
    """The user's own ckpt settings: `$XDG_CONFIG_HOME/ckpt/config.toml` (default ~/.config/ckpt/config.toml)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ckpt" / "config.toml"


def trusted_arch() -> list[str]:
    """The packages whose modules a manifest's architecture may import: ckpt.zoo, plus what the user
    trusts from outside any workspace (a manifest is other people's input in a shared one): the
    CKPT_TRUSTED_ARCH environment variable (names separated by commas) and `trusted_arch = [...]` in
    user_config_path(). Raises UsageError for a config file that is not valid TOML."""
    names = list(DEFAULT_TRUSTED_ARCH)
    names += [n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()]
    config = user_config_path()
    if config.is_file():
        import tomllib

        try:
            listed = tomllib.loads(config.read_text(encoding="utf-8")).get("trusted_arch", [])
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"cannot read '{config}': {e}", path=config, hint="fix or remove it") from None
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise UsageError(f"'{config}': trusted_arch must be a list of package names", path=config)
        names += listed
    return names


def _is_trusted(module_name: str, trusted: Sequence[str]) -> bool:
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted if t)


def build_network(factory: str, kwargs: dict[str, Any], *, from_manifest: bool = False) -> torch.nn.Module:
    """Import `factory` ("package.module:name") and call it with `kwargs`; return the torch module.

    Importing a module runs its code, so a factory named by a manifest is imported only from a package
    the user trusts (`trusted_arch`), and must be a `torch.nn.Module` class: a function could do anything
    when called. A factory the user names with --arch is theirs to trust. Raises ArchitectureError
    (exit 2), or UnsafeFileError (exit 6) for a manifest naming an untrusted package or a function.
    """
    module_name, sep, attr = factory.partition(":")
    shown = factory if len(factory) <= 100 else factory[:97] + "..."
    if not sep or not _MODULE_NAME.fullmatch(module_name) or not _MODULE_NAME.fullmatch(attr):
        raise ArchitectureError(f"invalid architecture {shown!r}", hint="use 'package.module:factory'")
    if from_manifest and not _is_trusted(module_name, trusted_arch()):
        top = module_name.split(".")[0]
        raise UnsafeFileError(
            f"the manifest's architecture '{shown}' is in package '{top}', which is not trusted: importing it"
            " would run its code",
            hint=f"if you trust it, pass --arch {shown}, or set {TRUST_ENV}={top}"
            f' (or trusted_arch = ["{top}"] in {user_config_path()})',
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ArchitectureError(
            f"cannot import module '{module_name}' for architecture '{factory}' ({e})",
            hint="install the package that defines it, or pass --arch package.module:factory",
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ArchitectureError(
                f"module '{module_name}' has no '{attr}' (architecture '{factory}')",
                hint="pass --arch package.module:factory",
            ) from None
    is_module_class = inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
    if from_manifest and not is_module_class:
        raise UnsafeFileError(
            f"the manifest's architecture '{factory}' is not a torch.nn.Module class; calling it could run anything",
            hint=f"if you trust it, pass --arch {factory}",
        )
    if not callable(obj):
        raise ArchitectureError(f"architecture '{factory}' is not callable")
    try:
        net = obj(**kwargs)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(
            f"cannot build '{factory}' with keyword arguments {json.dumps(kwargs, sort_keys=True)}: {e}",
            hint="fix --arch-kwargs (a JSON object)",
        ) from None
    if not isinstance(net, torch.nn.Module):
        raise ArchitectureError(f"'{factory}' returned a {type(net).__name__}, not a torch.nn.Module")
    return net
