"""Self-describing weight files: a safetensors file whose metadata holds the architecture name and its config
(`{"arch": "xlsr", "config": "{...json...}"}`), so `load_model(path)` needs nothing but the file; the shipped
models in `weights/`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..store import PROJECT_ROOT, atomic_path
from .networks import build_model, model_spec
from .usermodel import lookup

WEIGHTS_DIR = PROJECT_ROOT / "weights"


def save_weights(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model's weights and spec to a safetensors file, atomically (`sr.store.atomic_path`).

    Args:
        model: a model built here (`build_model`), on any device.
        path: the weight file to write; its folder is created.
        extra: more metadata (training config, steps, validation PSNR), each value stored as a JSON string.

    Returns:
        `path`.
    """
    path = Path(path)
    spec = model_spec(model)
    metadata = {"arch": spec["arch"], "config": json.dumps(spec["config"])}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return path


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """The weight file of a shipped model name (`xlsr-clip`) or a path.

    Args:
        name_or_path: a file (absolute, or relative to the working directory or to the project), or the stem
            of a file in `weights/`.

    Returns:
        the file's path.

    Raises:
        FileNotFoundError: neither a file nor a shipped name; the message lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if shipped.is_file():
        return shipped
    in_project = WEIGHTS_DIR.parent / path  # e.g. runs/<name>.safetensors, trained in the app
    if not path.is_absolute() and in_project.is_file():
        return in_project
    names = ", ".join(shipped_models()) or "(none)"
    raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a file, and not a shipped model ({names})")


def shipped_models() -> list[str]:
    """The shipped model names.

    Returns:
        the stems of the `.safetensors` files in `weights/`, sorted.
    """
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def read_metadata(name_or_path) -> dict:
    """The metadata of a weight file, JSON values decoded.

    Args:
        name_or_path: a shipped model name or a weight file.

    Returns:
        {key: decoded value}; a value that is not JSON stays a string.

    Raises:
        FileNotFoundError: no such model.
        ValueError: the file is not a safetensors file.
    """
    path = resolve_weights(name_or_path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{path.name} is not a safetensors weight file ({error})") from None
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def load_model(name_or_path: str | os.PathLike) -> nn.Module:
    """Build the model described by a weight file and load its weights (no pickle is executed).

    Args:
        name_or_path: a shipped model name or a weight file.

    Returns:
        the model on the CPU, in eval mode.

    Raises:
        FileNotFoundError: no such model.
        ValueError: not a safetensors file, or one without our architecture metadata, or weights that do
            not fit the recorded architecture.
    """
    if lookup(str(name_or_path)) is not None:
        raise ValueError(f"{name_or_path} is an ONNX model: it has no PyTorch weights (use the ort or openvino "
                         "engines)")
    path = resolve_weights(name_or_path)
    metadata = read_metadata(path)
    if "arch" not in metadata or "config" not in metadata:
        raise ValueError(f"{path.name} has no 'arch'/'config' metadata: it was not written by sr.save_weights")
    model = build_model(metadata["arch"], **metadata["config"])
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path.name}: weights do not match {metadata['arch']} {metadata['config']}: {error}") from None
    return model.eval()
