"""Training checkpoints: the training state flattened into safetensors + JSON (no pickle), finding a run's latest
checkpoint, reading its config back, a portable (smaller) copy of a checkpoint to carry between machines, and
starting from a safron-exported ONNX generator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file, save_file

from ..checkpoints import CONFIG_METADATA_KEY, GENERATOR_PREFIX, published_tensors, tensors_under
from ..errors import ModelError, SafronInputError, first_line
from ..files import written_atomically
from ..models import Generator
from .config import CHECKPOINTS_FOLDER, CHECKPOINT_FORMAT, TrainConfig, _DISCRIMINATOR_PREFIX


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


def portable_checkpoint(state_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a portable copy of a training checkpoint into `out_dir` (same step-N.json/.safetensors names) and
    return its JSON: the published generator (the moving average when the run keeps one) as the generator and
    the discriminator, both in fp16, without Adam's moments or the raw generator. About a sixth of the size (a
    width-32 generator and width-64 discriminator: 42 MB against 250), so that a run can travel back from a lent
    GPU machine (64 MiB) and continue with `train(init=...)` on another machine or in another session: the
    discriminator it was trained against comes along, which a fresh one (init from an exported generator) would
    first have to relearn while it misleads the generator; the optimisers restart, as with any init."""
    state_path = training_checkpoint(state_path)
    state, tensors = read_checkpoint(state_path)
    weights = state_path.with_suffix(".safetensors")
    portable = {GENERATOR_PREFIX + k: v.half() for k, v in published_tensors(tensors).items()}
    portable |= {_DISCRIMINATOR_PREFIX + k: v.half() for k, v in tensors_under(tensors, _DISCRIMINATOR_PREFIX).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_weights = out_dir / weights.name
    metadata = {CONFIG_METADATA_KEY: json.dumps(state["generator"], sort_keys=True)}
    with written_atomically(out_weights) as temporary:
        save_file({k: v.contiguous() for k, v in portable.items()}, str(temporary), metadata=metadata)
    # No optimiser state (Trainer.load starts fresh optimisers then), no grad scaler; the settings stay for the record.
    portable_state = dict(state, optimisers=None, grad_scaler=None, portable=True)
    out_state = out_weights.with_suffix(".json")
    with written_atomically(out_state) as temporary:
        temporary.write_text(json.dumps(portable_state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_state


def read_checkpoint(state_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(training state, tensors on the CPU) of the checkpoint whose JSON is `state_path`; one-line ModelErrors."""
    state = _read_state(state_path)
    weights = state_path.with_suffix(".safetensors")
    try:
        return state, load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{weights}: unreadable checkpoint ({first_line(exc)})") from None


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
    folded context convolution is unfolded (`models.unfold_one_hot`), a decoder trained resizing resizes again
    (`models.resize_decoder`). Fine-tuning starts from it with `init`: this is how training continues from a shipped
    model whose training run is gone."""
    from ..backends.torch_backend import load_onnx_generator

    generator = load_onnx_generator(path, as_trained=True)
    return generator.train().requires_grad_(True)


def _is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"
