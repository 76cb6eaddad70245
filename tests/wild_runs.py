"""Runs as large training setups write them, made with the real libraries where they install here (torch's
DCP, safetensors, transformers), else with torch.save in the libraries' real layouts and stand-in classes of
the same module and name (DeepSpeed, Composer). Used by tests/test_wild_formats.py."""

from __future__ import annotations

import contextlib
import enum
import io
import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A small state dict with the dtypes and shapes real ones have (a scalar, an int buffer, bf16, a view)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 8, generator=g),
        "layer.0.weight": torch.randn(8, 6, generator=g).t(),  # a transposed view: not contiguous
        "layer.0.bias": torch.randn(6, generator=g),
        "norm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
        "norm.num_batches": torch.tensor(seed, dtype=torch.int64),
        "head.weight": torch.randn(3, 6, generator=g).half(),
    }


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v.contiguous()), k


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- DCP -----------------------------------------------------------------------------------------------


def dcp_save(folder: Path, obj: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process": that is the point
        dcp.save(obj, checkpoint_id=str(folder))


def dcp_run(root: Path, steps: tuple[int, ...] = (100, 200)) -> dict[int, dict[str, torch.Tensor]]:
    """`root/step_N/` written by torch.distributed.checkpoint.save: the model, an optimizer, a step count."""
    out = {}
    for step in steps:
        sd = state_dict(step)
        dcp_save(root / f"step_{step}", {"model": sd, "optim": {"exp_avg": torch.ones(4)}, "step": step})
        out[step] = sd
    return out


def dcp_split(folder: Path, whole: torch.Tensor, grid: tuple[int, ...]) -> None:
    """A DCP folder holding `whole` as "model.w", split into chunks as ranks of a `grid` would write it: one
    `__R_0.distcp` per rank, each chunk a torch.save archive at its offset, and a `.metadata` pickled from
    DCP's own classes (what a multi-process save writes; one process cannot make chunks)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder.mkdir(parents=True)
    chunks, storage = [], {}
    pieces = [whole]
    for dim, n in enumerate(grid):
        pieces = [c for p in pieces for c in p.chunk(n, dim)]
    offsets = []
    for i in range(len(pieces)):
        off = [0] * whole.dim()
        flat = i
        for dim in reversed(range(len(grid))):
            idx, flat = flat % grid[dim], flat // grid[dim]
            off[dim] = idx * whole.shape[dim] // grid[dim]
        offsets.append(torch.Size(off))
    for rank, (piece, off) in enumerate(zip(pieces, offsets, strict=True)):
        buf = io.BytesIO()
        torch.save(piece.clone(), buf)
        name = f"__{rank}_0.distcp"
        (folder / name).write_bytes(b"\0" * 64 + buf.getvalue())  # at an offset, as after other items
        chunks.append(ChunkStorageMetadata(offsets=off, sizes=piece.shape))
        storage[MetadataIndex("model.w", off, rank)] = _StorageInfo(name, 64, len(buf.getvalue()))
    meta = Metadata(
        state_dict_metadata={
            "model.w": TensorStorageMetadata(TensorProperties(dtype=whole.dtype), whole.shape, chunks)
        },
        planner_data={"model.w": ("model", "w")},
        storage_data=storage,
    )
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


# --- DeepSpeed and Composer: their own classes, as stand-ins of the same module and name ------------------


class ZeroStageEnum(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class LossScaler:
    def __init__(self, scale: float = 1.0):
        self.cur_scale = scale
        self.dynamic = False


@contextlib.contextmanager
def deepspeed_classes() -> Iterator[None]:
    """deepspeed.runtime.zero.config.ZeroStageEnum and deepspeed.runtime.fp16.loss_scaler.LossScaler, importable
    (for pickle) while the block runs, then gone."""
    made = {}
    for qual, cls in (
        ("deepspeed.runtime.zero.config", ZeroStageEnum),
        ("deepspeed.runtime.fp16.loss_scaler", LossScaler),
    ):
        parts = qual.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                made[name] = sys.modules[name] = types.ModuleType(name)
        setattr(sys.modules[qual], cls.__name__, cls)
    saved = {c: (c.__module__, c.__qualname__) for c in (ZeroStageEnum, LossScaler)}
    ZeroStageEnum.__module__, ZeroStageEnum.__qualname__ = "deepspeed.runtime.zero.config", "ZeroStageEnum"
    LossScaler.__module__, LossScaler.__qualname__ = "deepspeed.runtime.fp16.loss_scaler", "LossScaler"
    try:
        yield
    finally:
        for c, (m, q) in saved.items():
            c.__module__, c.__qualname__ = m, q
        for name in made:
            sys.modules.pop(name, None)


def deepspeed_run(root: Path, steps: tuple[int, ...] = (10, 20), stage: int = 2, ranks: int = 2) -> dict[int, Any]:
    """`root/global_stepN/` as DeepSpeed's engine.save_checkpoint writes them, and `root/latest`."""
    out = {}
    with deepspeed_classes():
        for step in steps:
            folder = root / f"global_step{step}"
            folder.mkdir(parents=True)
            sd = state_dict(step)
            shapes = OrderedDict((k, v.shape) for k, v in sd.items() if v.is_floating_point())
            module = sd if stage < 3 else {k: torch.empty(0, dtype=v.dtype) for k, v in sd.items()}
            states = {
                "module": module,
                "buffer_names": ["norm.num_batches"],
                "optimizer": None,
                "param_shapes": [shapes],
                "frozen_param_shapes": None,
                "shared_params": {},
                "frozen_param_fragments": None,
                "lr_scheduler": None,
                "data_sampler": None,
                "random_ltd": None,
                "sparse_tensor_module_names": set(),
                "skipped_steps": 0,
                "global_steps": step,
                "global_samples": step * 8,
                "dp_world_size": ranks,
                "mp_world_size": 1,
                "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}},
                "ds_version": "0.15.1",
            }
            model_file = "mp_rank_00_model_states.pt"
            flat: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
            if stage == 3:
                # the parameters in two groups, each rank holding ceil(numel / ranks) of each, zero-padded
                frozen = "layer.0.bias"  # a frozen parameter: a fragment in each rank's model states
                names = [k for k in shapes if k != frozen]
                states["param_shapes"] = [
                    OrderedDict((k, shapes[k]) for k in names[:2]),
                    OrderedDict((k, shapes[k]) for k in names[2:]),
                ]
                states["frozen_param_shapes"] = OrderedDict([(frozen, shapes[frozen])])
                states["module"]["norm.num_batches"] = sd["norm.num_batches"]  # buffers are whole
                for group in states["param_shapes"]:
                    parts: list[list[torch.Tensor]] = [[] for _ in range(ranks)]
                    for k in group:
                        v = sd[k].detach().flatten().float()
                        per = -(-v.numel() // ranks)
                        v = torch.cat([v, torch.zeros(per * ranks - v.numel())])
                        for r in range(ranks):
                            parts[r].append(v[r * per : (r + 1) * per])
                    for r in range(ranks):
                        flat[r].append(torch.cat(parts[r]))
                v = sd[frozen].detach().flatten()
                per = -(-v.numel() // ranks)
                v = torch.cat([v, torch.zeros(per * ranks - v.numel(), dtype=v.dtype)])
                for r in range(ranks):
                    states["frozen_param_fragments"] = {frozen: v[r * per : (r + 1) * per].clone()}
                    torch.save(states, folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            else:
                torch.save(states, folder / model_file)
            for r in range(ranks):
                optim = {
                    "optimizer_state_dict": {
                        "loss_scaler": LossScaler(),
                        "dynamic_loss_scale": False,
                        "overflow": False,
                        "clip_grad": 1.0,
                        "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(16)}}, "param_groups": []},
                        "single_partition_of_fp32_groups": [torch.zeros(16)],
                        **({"fp32_flat_groups": flat[r]} if stage == 3 else {}),
                        "zero_stage": ZeroStageEnum(stage),
                        "group_paddings": [0],
                        "partition_count": [ranks],
                        "ds_version": "0.15.1",
                    },
                    "ds_config": states["ds_config"],
                    "ds_version": "0.15.1",
                }
                prefix = "bf16_" if stage < 3 else ""
                torch.save(optim, folder / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
            out[step] = sd
    (root / "latest").write_text(f"global_step{steps[-1]}")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script\n")
    return out


def composer_run(root: Path, steps: tuple[tuple[int, int], ...] = ((1, 10), (2, 20))) -> dict[int, Any]:
    """`root/ep{E}-ba{B}-rank0.pt` as Composer's Trainer saves them, and the `latest-rank0.pt` symlink."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for epoch, batch in steps:
        sd = state_dict(batch)
        state = {
            "state": {
                "model": sd,
                "optimizers": {"Adam": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]}},
                "schedulers": [],
                "algorithms": [],
                "callbacks": {},
                "timestamp": {"epoch": epoch, "batch": batch, "sample": batch * 8, "token": 0},
                "rank_zero_seed": 42,
                "run_name": "wild-run",
                "integrations": {},
                "metadata": {"composer_env_info": {"composer_version": "0.26.0"}},
            },
            "rng": [{"python": 1, "torch": torch.zeros(8, dtype=torch.uint8)}],
        }
        torch.save(state, root / f"ep{epoch}-ba{batch}-rank0.pt")
        out[batch] = sd
    last = f"ep{steps[-1][0]}-ba{steps[-1][1]}-rank0.pt"
    os.symlink(last, root / "latest-rank0.pt")
    return out
