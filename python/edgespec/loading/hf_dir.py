"""Hugging Face model directories: config.json + (sharded) safetensors or PyTorch .bin files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFormatError
from .source import dense_linear


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None


class HFDirectorySource:
    """Tensors of a model directory. Safetensors shards are memory-mapped and read lazily."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = str(self.dir)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, torch.Tensor] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFormatError(f"{index}: no 'weight_map' object")
            for name, shard in weight_map.items():
                shard_path = self.dir / shard
                if not shard_path.exists():
                    raise ModelFormatError(f"{index}: shard {shard!r} listed for {name!r} does not exist")
                self._where[name] = shard_path
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            for f in files:
                for name in self._open(f).keys():
                    self._where[name] = f
            if not files:
                bins = sorted(self.dir.glob("pytorch_model*.bin"))
                if not bins:
                    raise ModelFormatError(
                        f"{self.dir}: no *.safetensors, model.safetensors.index.json or pytorch_model*.bin found")
                for f in bins:
                    self._bin.update(_load_bin(f))

    def _open(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelFormatError(f"{f}: not a readable safetensors file ({exc})") from None
        return self._handles[f]

    def names(self) -> list[str]:
        return sorted(set(self._where) | set(self._bin))

    def has(self, name: str) -> bool:
        return name in self._where or name in self._bin

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        # Read on the host whatever `device` is: dense_linear's one `.to(device, dtype)` then
        # converts and copies it.
        if name in self._bin:
            return self._bin[name]
        if name not in self._where:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            return self._open(self._where[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{self._where[name]}: cannot read tensor {name!r} ({exc})") from None

    def linear(self, prefix: str, device: torch.device, dtype: torch.dtype):
        return dense_linear(self, prefix, device, dtype)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt pickles
        raise ModelFormatError(f"{path}: not a readable PyTorch state dict ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path}: expected a dict of tensors")
    return state
