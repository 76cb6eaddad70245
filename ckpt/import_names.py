"""What a run's names, logs and state files say about its checkpoints, before they are imported: Lightning's
and plain file names, the Trainer's `log_history` and arguments, Lightning's `metrics.csv`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import fsutil

_LAST = re.compile(r"last(-v\d+)?")
_KEY = re.compile(r"(?:^|(?<=-))([A-Za-z_][A-Za-z0-9_.@]*)=")
_VERSION = re.compile(r"-v\d+$")
_INT = re.compile(r"[+-]?\d+")
_NAMED_NUMBER = re.compile(r"(?i)(?<![a-z])(step|epoch|iter|it)[_\-=]?(\d+)")


# log_history keys that describe the run's speed, not the model
_HF_NOISE = ("_runtime", "_per_second", "total_flos")


def parse_lightning_name(name: str) -> tuple[int | None, int | None, dict[str, float]]:
    """(epoch, step, metrics) from a ModelCheckpoint file name such as `epoch=3-step=120-val_loss=0.230.ckpt`.

    Pieces are `key=value` joined by `-` (Lightning's CHECKPOINT_JOIN_CHAR), with an optional prefix and a
    `-vN` version suffix; a value may be negative. Pieces that are not numbers are ignored.
    """
    stem = name[: -len(".ckpt")] if name.endswith(".ckpt") else Path(name).stem
    stem = _VERSION.sub("", stem)
    epoch = step = None
    metrics: dict[str, float] = {}
    parts = _KEY.split(stem)  # [prefix, key, value + "-", key, value + "-", ..., key, value]
    last = len(parts) - 2
    for i in range(1, len(parts), 2):
        key = parts[i]
        raw = parts[i + 1] if i == last else parts[i + 1][:-1]
        value: float
        if _INT.fullmatch(raw):
            value = int(raw)
            if key == "epoch":
                epoch = value
                continue
            if key == "step":
                step = value
                continue
        else:
            try:
                value = float(raw)
            except ValueError:
                continue
        metrics[key] = value
    return epoch, step, metrics


def parse_plain_name(name: str) -> tuple[int | None, int | None]:
    """(epoch, step) named in a plain file name such as `model_epoch5_step500.pt`, where present."""
    epoch = step = None
    for m in _NAMED_NUMBER.finditer(Path(name).stem):
        if m.group(1).lower() == "epoch":
            epoch = int(m.group(2))
        else:
            step = int(m.group(2))
    return epoch, step


def hf_metrics(state: dict[str, Any], step: int) -> tuple[int | None, dict[str, float]]:
    """(whole epoch, metrics) at `step` from a Trainer's `trainer_state.json`: its `log_history` entries
    whose `step` is `step` (eval_loss, loss, learning_rate...), speed figures left out. A fractional
    epoch is kept as the metric `hf_epoch` (the Trainer counts epochs as a float)."""
    metrics: dict[str, float] = {}
    epoch: float | None = None
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for k, v in entry.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or k == "step":
                continue
            if k == "epoch":
                epoch = v
            elif not k.endswith(_HF_NOISE):
                metrics[k] = v
    if epoch is None and state.get("global_step") == step and isinstance(state.get("epoch"), int | float):
        epoch = state["epoch"]
    if epoch is None or isinstance(epoch, bool):
        return None, metrics
    if float(epoch).is_integer():
        return int(epoch), metrics
    metrics["hf_epoch"] = float(epoch)
    return None, metrics


def read_metrics_csv(path: Path) -> dict[int, list[tuple[int, dict[str, float]]]] | None:
    """The rows of a Lightning CSVLogger's `metrics.csv` by epoch: (step, {metric: value}) in file order,
    empty cells left out. None when there is no such file or it has no `epoch` and `step` columns."""
    import csv

    try:
        with open(fsutil.open_regular(path), newline="", encoding="utf-8") as f:  # never a FIFO or device
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or "epoch" not in header or "step" not in header:
                return None
            e_col, s_col = header.index("epoch"), header.index("step")
            by_epoch: dict[int, list[tuple[int, dict[str, float]]]] = {}
            for row in reader:
                try:
                    epoch, step = int(float(row[e_col])), int(float(row[s_col]))
                except (ValueError, IndexError):
                    continue
                values: dict[str, float] = {}
                for name, cell in zip(header, row, strict=False):
                    if cell and name not in ("epoch", "step"):
                        try:
                            values[name] = float(cell)
                        except ValueError:
                            pass
                by_epoch.setdefault(epoch, []).append((step, values))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return by_epoch


def is_last(filename: str) -> bool:
    """Whether `filename` is Lightning's `last.ckpt` (or `last-v1.ckpt`...): a repeat of another checkpoint."""
    return filename.endswith(".ckpt") and bool(_LAST.fullmatch(filename[: -len(".ckpt")]))


def trainer_modes(path: Path) -> dict[str, str]:
    """{metric: "min" | "max"} from a Trainer's `training_args.bin`: its `metric_for_best_model`, named as
    the Trainer logs it (with the `eval_` prefix it adds), and `greater_is_better`; {} when unreadable."""
    if not path.is_file():
        return {}
    from .lightning_state import read_training_args

    args = read_training_args(path)
    metric = args.get("metric_for_best_model")
    if not isinstance(metric, str) or not metric:
        return {}
    name = metric if metric.startswith("eval_") else f"eval_{metric}"
    return {name: "max" if args.get("greater_is_better") is True else "min"}
