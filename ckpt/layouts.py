"""How large runs lay out their checkpoints: one folder (or file) per step, in a format's own layout.

- `dcp`: PyTorch distributed checkpoint, a folder with `.metadata` and `__R_I.distcp` files (Lightning's FSDP
  strategy and accelerate write them too, accelerate one folder down: `checkpoint_N/pytorch_model_fsdp_0/`).
- `sharded`: Hugging Face sharded safetensors, `model-00001-of-00003.safetensors` + `model.safetensors.index.json`
  (or the older `pytorch_model-00001-of-00002.bin` + `pytorch_model.bin.index.json`).
- `deepspeed`: `global_stepN/` folders (`mp_rank_00_model_states.pt`, `*zero_pp_rank_*_optim_states.pt`) and a
  `latest` file beside them naming the newest.
- `composer`: `ep{E}-ba{B}-rank{R}.pt` files and a `latest-rank0.pt` symlink to the newest.

Only names and directory listings are read here; docs/formats-checkpoints.md describes each layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("dcp", "sharded", "deepspeed", "composer")

COMPOSER_FILE = re.compile(r"ep(\d+)-ba(\d+)-rank(\d+)\.pt")
COMPOSER_LATEST = re.compile(r"latest-rank(\d+)\.pt")
DEEPSPEED_STEP = re.compile(r"global_step(\d+)")
DEEPSPEED_MODEL = re.compile(r"(?:.*zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt")
DEEPSPEED_OPTIM = re.compile(r".*zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt")
INDEX_SUFFIX = ".safetensors.index.json"
BIN_INDEX_SUFFIX = ".bin.index.json"  # older Trainers: pytorch_model-00001-of-00002.bin, torch zips
DCP_INNER = re.compile(r"pytorch_model_fsdp_\d+|optimizer_\d+")
_STEP = re.compile(r"(?i)(?<![a-z])(?:global_step|step|iter|it|ba|batch)[_\-=]?(\d+)")
_EPOCH = re.compile(r"(?i)(?<![a-z])(?:epoch|ep)[_\-=]?(\d+)")
_NUMBER = re.compile(r"\d+")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(slots=True)
class Step:
    """One checkpoint of a run: a step folder (or a Composer file), with what its name records."""

    path: Path
    name: str  # relative to the run folder
    is_dir: bool
    step: int | None
    epoch: int | None


@dataclass(slots=True)
class Pointer:
    """A run's `latest` file or symlink: it names the newest checkpoint and is not one itself."""

    path: Path
    name: str
    target: str


@dataclass(slots=True)
class RunLayout:
    kind: str
    steps: list[Step] = field(default_factory=list)
    pointers: list[Pointer] = field(default_factory=list)
    loose: list[Path] = field(default_factory=list)  # checkpoint files beside the step folders (not imported)
    links: list[Pointer] = field(default_factory=list)  # other symlinks in the run folder: never followed


def _names(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _is_dcp(entries: list[os.DirEntry[str]]) -> bool:
    names = {e.name for e in entries if e.is_file(follow_symlinks=False)}
    return ".metadata" in names and any(n.endswith(".distcp") for n in names)


def folder_kind(path: Path) -> str | None:
    """The layout of one checkpoint folder: "dcp", "sharded", "deepspeed", or None for any other folder.

    A DCP folder may be one level down (accelerate writes `pytorch_model_fsdp_0/` inside its step folder).
    """
    if not path.is_dir() or path.is_symlink():
        return None
    entries = _names(path)
    if _is_dcp(entries):
        return "dcp"
    files = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    if any(n.endswith((INDEX_SUFFIX, BIN_INDEX_SUFFIX)) for n in files):
        return "sharded"
    if any(DEEPSPEED_MODEL.fullmatch(n) or DEEPSPEED_OPTIM.fullmatch(n) for n in files):
        return "deepspeed"
    for e in entries:  # accelerate's FSDP step folder: pytorch_model_fsdp_0/ (and optimizer_0/) in DCP
        if e.is_dir(follow_symlinks=False) and DCP_INNER.fullmatch(e.name) and _is_dcp(_names(Path(e.path))):
            return "dcp"
    return None


def _link_inside(path: Path) -> str | None:
    """The name of a symlink in `path` when `path` would be a step folder if its links were files, else None."""
    entries = _names(path)
    links = [e.name for e in entries if e.is_symlink()]
    if not links:
        return None
    names = {e.name for e in entries}
    dcp = ".metadata" in names and any(n.endswith(".distcp") for n in names)
    sharded = any(n.endswith((INDEX_SUFFIX, BIN_INDEX_SUFFIX)) for n in names)
    ds = any(DEEPSPEED_MODEL.fullmatch(n) or DEEPSPEED_OPTIM.fullmatch(n) for n in names)
    return links[0] if dcp or sharded or ds else None


def link_below(path: Path) -> str | None:
    """The path (relative to folder `path`, in name order) of the first symlink at any depth under it, else None:
    a step folder holding one (a shard replaced by a link) is skipped, never read through."""
    for e in _names(path):
        if e.is_symlink():
            return e.name
        if e.is_dir(follow_symlinks=False):
            inner = link_below(Path(e.path))
            if inner is not None:
                return f"{e.name}/{inner}"
    return None


def step_epoch(name: str) -> tuple[int | None, int | None]:
    """(step, epoch) that a step folder's or file's name records: `global_step300`, `step_300`,
    `epoch=1-step=300`, Composer's `ep1-ba300-rank0.pt`; a name with one number and no word is that step."""
    m = COMPOSER_FILE.fullmatch(name)
    if m:
        return int(m.group(2)), int(m.group(1))
    stem = name[:-3] if name.endswith(".pt") else name
    steps, epochs = _STEP.findall(stem), _EPOCH.findall(stem)
    step = int(steps[-1]) if steps else None
    epoch = int(epochs[-1]) if epochs else None
    if step is None and epoch is None:
        numbers = _NUMBER.findall(stem)
        if len(numbers) == 1:
            step = int(numbers[0])
    return step, epoch


def pointer_target(path: Path) -> str | None:
    """What a DeepSpeed `latest` file names (a short line of text), or None when it is not one."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 256:
            return None
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and "\n" not in text else None


def find_run(path: Path, *, mixed: bool = False) -> RunLayout | None:
    """The checkpoints of a run folder written in one of KINDS (or `path` itself when it is one step
    folder), ordered by step, with the run's latest pointers; None when `path` holds none of them, or
    (unless `mixed`) when checkpoint files lie beside its step folders (then it is no such run for sure)."""
    kind = folder_kind(path)
    if kind is not None:
        step, epoch = step_epoch(path.name)
        return RunLayout(kind, [Step(path, path.name, True, step, epoch)])
    if not path.is_dir():
        return None
    entries = _names(path)
    steps: list[Step] = []
    pointers: list[Pointer] = []
    kinds: list[str] = []
    loose: list[Path] = []
    links: list[Pointer] = []
    for e in entries:
        p = Path(e.path)
        if e.name.startswith("."):
            continue
        if e.is_symlink():
            if COMPOSER_LATEST.fullmatch(e.name) or e.name == "latest":
                pointers.append(Pointer(p, e.name, os.readlink(p)))
            else:
                links.append(Pointer(p, e.name, os.readlink(p)))
            continue
        if e.is_dir():
            k = folder_kind(p)
            link = _link_inside(p) if k is None else None
            if k is not None:
                link = link_below(p)  # a shard (at any depth) replaced by a link: the step is skipped
            if link is not None:  # a step folder but for a link in it: never read through, said as skipped
                links.append(Pointer(p, e.name, f"holds the symlink {link}"))
            elif k is not None:
                kinds.append(k)
                step, epoch = step_epoch(e.name)
                steps.append(Step(p, e.name, True, step, epoch))
        elif COMPOSER_FILE.fullmatch(e.name):
            kinds.append("composer")
            step, epoch = step_epoch(e.name)
            steps.append(Step(p, e.name, False, step, epoch))
        elif e.name == "latest":
            target = pointer_target(p)
            if target is not None:
                pointers.append(Pointer(p, e.name, target))
        elif e.name.endswith(_CHECKPOINT_SUFFIXES):
            loose.append(p)
    if loose and steps and not mixed:
        return None  # checkpoint files beside the step folders: not one of these layouts (--format says which)
    if not steps:
        inner = path / "checkpoints"  # Lightning: version_N/checkpoints/epoch=1-step=300.ckpt/ (FSDP, sharded)
        found = inner.is_dir() and not inner.is_symlink() and folder_kind(inner) is None
        return find_run(inner, mixed=mixed) if found else None
    steps.sort(key=lambda s: (s.step is None, s.step or 0, s.name))  # by step; unnumbered ones last
    return RunLayout(max(set(kinds), key=kinds.count), steps, pointers, loose, links)
