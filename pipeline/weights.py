"""Weights on disk: safetensors shards read and written one tensor at a time, the PEFT adapter's files.

Reading goes through ``safetensors.safe_open``, which checks the header against the file (offsets contiguous,
the data covering the file exactly) and reads lazily. It uses the ``pread`` backend: each tensor is read into
fresh memory and nothing else of the file is mapped, so pages of a shard already merged never stay resident
(the default ``mmap`` backend keeps every page read until the file is closed; benchmarks/merge.md). Writing is
the streaming ``write_shard``, which the library has no equivalent of: the header is planned from the entries,
then each tensor is produced, written and dropped. Format: 8-byte little-endian header length N, N bytes of
JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw tensor bytes.

A light module: torch and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Rows of a weight matrix merged at once: 4,096 x 8,192 fp32 = 128 MiB of temporary memory on a 70B.
ROW_CHUNK = 4096


class ExportInputError(UsageError):
    """A file the export needs is missing or corrupt, or the arguments conflict (exit code 2); says the fix."""


# --------------------------------------------------------------------------------------------------
# dtypes: safetensors codes and their torch names

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _torch_dtype(code: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[code])


def _dtype_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, torch_name in _DTYPES.items() if torch_name == name)


# --------------------------------------------------------------------------------------------------
# Shards


class ShardReader:
    """Reads tensors of one safetensors file on demand (``safe_open``, which checks the header against the file).

    Attributes:
        path: The file.
        metadata: The header's ``__metadata__`` strings ({} when there are none).
        tensors: ``{name: {"dtype": code, "shape": [...]}}`` of every tensor, in file order.
    """

    def __init__(self, path: str | Path, what: str, fix: str):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self._what, self._fix = what, fix
        if not self.path.is_file():
            raise ExportInputError(f"{self.path}: {what} not found; {fix}")
        try:
            self._handle = safe_open(self.path, framework="pt", backend="pread")
        except (SafetensorError, OSError, ValueError) as exc:
            raise self._corrupt(exc) from None
        try:
            self.metadata: dict[str, str] = self._handle.metadata() or {}
            self.tensors: dict[str, dict[str, Any]] = {}
            for name in self._handle.offset_keys():
                part = self._handle.get_slice(name)
                self.tensors[name] = {"dtype": part.get_dtype(), "shape": list(part.get_shape())}
                if self.tensors[name]["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {name} has unsupported dtype {self.tensors[name]['dtype']}")
        except (SafetensorError, ValueError) as exc:
            self.close()
            raise self._corrupt(exc) from None

    def _corrupt(self, exc: Exception) -> ExportInputError:
        return ExportInputError(f"{self.path}: {self._what} is corrupt or truncated ({exc}); {self._fix}")

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def read(self, name: str) -> Any:
        """One tensor, read into fresh memory (nothing else of the file stays resident)."""
        from safetensors import SafetensorError

        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise ExportInputError(f"{self.path}: tensor {name} is truncated ({exc}); copy the file again") from None

    def close(self) -> None:
        """Close the file."""
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_shard(
    path: str | Path,
    entries: list[tuple[str, str, list[int]]],
    produce: Callable[[str], Any],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor, atomically (temporary file, then rename).

    Args:
        path: Output file.
        entries: ``(name, dtype code, shape)`` of every tensor, in the order they are written.
        produce: Returns the tensor for a name; it is written and dropped before the next is produced.
        metadata: The ``__metadata__`` strings (``format: pt`` is added).

    Returns:
        Bytes of tensor data written.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, code, shape in entries:
        nbytes = math.prod(shape) * torch.empty(0, dtype=_torch_dtype(code)).element_size()
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)))
            handle.write(raw)
            for name, code, shape in entries:
                tensor = produce(name)
                if tensor.dtype != _torch_dtype(code) or list(tensor.shape) != list(shape):
                    raise ValueError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, expected {code} {shape}")
                handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return offset


def base_shards(model_dir: Path) -> list[Path]:
    """The base's safetensors files, in index order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ExportInputError(
                f"{index}: not a valid safetensors index ({exc}); copy the base model again"
            ) from None
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportInputError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json. The merge reads safetensors only; "
        "convert .bin weights first (transformers: model.save_pretrained(dir, safe_serialization=True))."
    )


# --------------------------------------------------------------------------------------------------
# The adapter


@dataclass
class Adapter:
    """LoRA factors by target module, whole replacement tensors (modules_to_save), and the scale."""

    config: dict[str, Any]
    scale: float
    lora: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # module -> (A [r, in], B [out, r])
    replaced: dict[str, Any] = field(default_factory=dict)  # parameter name -> tensor

    @property
    def nbytes(self) -> int:
        """Memory the adapter holds."""
        tensors = [t for pair in self.lora.values() for t in pair] + list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory, with a clear error for anything missing, corrupt or unsupported."""
    adapter_dir = Path(adapter_dir)
    fix = f"re-run training, or restore {adapter_dir} from the MLflow run's 'adapter' artifact"
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ExportInputError(f"{config_path}: adapter config not found; {fix}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportInputError(f"{config_path}: adapter config is corrupt ({exc}); {fix}") from None
    unsupported = [
        key for key in ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern") if config.get(key)
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ExportInputError(
            f"{config_path}: the streaming merge handles plain LoRA; this adapter uses "
            f"{', '.join(unsupported) or config.get('peft_type')}. Export the adapter only (without --merge)."
        )
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r (peft's LoraLayer.update_layer).
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapter = Adapter(config=config, scale=scale)
    factors: dict[str, dict[str, Any]] = {}
    with ShardReader(adapter_dir / ADAPTER_WEIGHTS, "adapter weights", fix) as reader:
        for key in reader.keys():
            name = key.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in name:
                    factors.setdefault(name.split(marker)[0], {})[part] = reader.read(key)
                    break
            else:
                adapter.replaced[name] = reader.read(key)
    for module, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ExportInputError(f"{adapter_dir / ADAPTER_WEIGHTS}: {module} lacks lora_A or lora_B; {fix}")
        adapter.lora[module] = (pair["lora_A"], pair["lora_B"])
    return adapter


# --------------------------------------------------------------------------------------------------
# The memory the streaming holds


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS between shards (glibc ``malloc_trim``; a no-op elsewhere).

    glibc serves allocations below its dynamic mmap threshold (up to 32 MB) from the heap and keeps them after
    they are freed, so on a model with mid-sized tensors RSS would creep upward shard after shard.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB: since the last ``reset_peak_rss`` where Linux allows it.

    Reads VmHWM from /proc/self/status; elsewhere ru_maxrss (KiB on Linux, bytes on macOS), the lifetime peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    Imports alone can leave a transient peak above what a merge adds, which would hide the merge's own peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
