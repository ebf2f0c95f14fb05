"""Reading `.safetensors` files tensor by tensor, with errors that name the broken file.

The format is an 8-byte little-endian header length, a JSON header mapping names to
`{dtype, shape, data_offsets}`, then the raw bytes. Reading it directly (memory-mapped) supports
bfloat16 without torch and lets a truncated download fail with a clear message up front.
"""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

from kvjax.errors import KvjaxError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(KvjaxError, ValueError):
    """A checkpoint's weight files are missing, truncated or inconsistent with its config."""


class SafetensorsFile:
    """A memory-mapped safetensors file: `names`, `shape(name)`, `read(name) -> np.ndarray`."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is truncated: {size} bytes, no safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path} is truncated: header claims {n} bytes, file has {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path} is truncated: tensors need {self._data_start + end} bytes, file has {size}"
            )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self._header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        try:
            lo, hi = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name} has a malformed header entry {info!r}") from None
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if hi - lo != need or lo < 0:
            raise CheckpointError(
                f"{self.path}: tensor {name} claims shape {list(shape)} {info['dtype']} ({need} bytes) but its "
                f"byte range [{lo}, {hi}) holds {hi - lo}: the header is corrupt"
            )
        raw = self._mmap[self._data_start + lo : self._data_start + hi]
        return raw.view(dtype).reshape(shape)


class TensorStore:
    """All tensors of a checkpoint directory, from `model.safetensors` or a sharded index."""

    def __init__(self, directory: str | pathlib.Path):
        directory = pathlib.Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        self._where: dict[str, SafetensorsFile] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                if fname not in files:
                    if not (directory / fname).exists():
                        raise CheckpointError(f"{index} lists shard {fname}, which is missing")
                    files[fname] = SafetensorsFile(directory / fname)
                self._where[name] = files[fname]
        elif single.exists():
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.names}
        else:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {directory}"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        f = self._where[name]
        if expected_shape is not None and f.shape(name) != tuple(expected_shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {f.shape(name)}, config.json implies {tuple(expected_shape)}"
            )
        return f.read(name)
