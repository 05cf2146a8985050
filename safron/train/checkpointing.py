"""Training checkpoints: the training state flattened into safetensors + JSON (no pickle), finding a run's latest
checkpoint, reading its config back, and starting from a safron-exported ONNX generator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, SafronInputError
from ..models import Generator, unfold_one_hot
from .config import CHECKPOINTS_FOLDER, CHECKPOINT_FORMAT, TrainConfig


def _flatten_optimiser(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict as flat tensors (for safetensors) plus the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimiser(prefix: str, tensors: dict[str, torch.Tensor], stored: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) + len("state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in stored["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(group, betas=tuple(group["betas"])) for group in stored["param_groups"]]
    return {"state": state, "param_groups": groups}


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The training-state JSON of the run's latest complete checkpoint, or None."""
    folder = Path(run_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*.json") if p.with_suffix(".safetensors").is_file()]
    return max(complete, key=lambda p: p.name, default=None)


def training_checkpoint(path: str | os.PathLike) -> Path:
    """The training-state JSON that `path` names: a run directory (its latest checkpoint), or a checkpoint's
    .json or .safetensors (both must be there)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise SafronInputError(f"{path}: no training checkpoint in this run directory "
                                   f"(expected {CHECKPOINTS_FOLDER}/step-*.json)")
        return found
    state = path.with_suffix(".json")
    if path.suffix in (".json", ".safetensors") and state.is_file() and state.with_suffix(".safetensors").is_file():
        return state
    raise SafronInputError(f"{path}: not a run directory or a training checkpoint (a {CHECKPOINTS_FOLDER}/step-N.json "
                           f"beside its .safetensors)")


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable training checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a safron training checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _stored_config(state_path: Path) -> TrainConfig:
    training = _read_state(state_path).get("training")
    if isinstance(training, dict):
        training = {"small_images": "skip", **training}  # what runs did before the setting existed
    try:
        return TrainConfig(**training)
    except TypeError as exc:
        raise ModelError(f"{state_path}: training settings not understood ({exc})") from None


def generator_from_onnx(path: str | os.PathLike) -> Generator:
    """The generator of a safron-exported ONNX file (the embedded default model, say), in a form that trains: a
    folded context convolution is unfolded (`models.unfold_one_hot`). Fine-tuning starts from it with `init`: this
    is how training continues from a shipped model whose training run is gone."""
    from ..backends.torch_backend import load_onnx_generator

    generator = unfold_one_hot(load_onnx_generator(path))
    return generator.train().requires_grad_(True)


def _is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"
