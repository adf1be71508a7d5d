"""A lean GGUF header parser: metadata and tensor offsets, tensor data left memory-mapped.

Why not ``gguf.GGUFReader``: it builds a numpy view per element of every metadata array, and a
GGUF's embedded vocabulary has ~100k strings (tokens + merges), so opening SmolLM2's file took
~5 s of pure Python on the 2-core box, paid again by every pipeline worker. This parser reads
the same format (GGUF v2/v3, little-endian) with one ``struct`` call per value, ~30x faster, and
keeps the tensor bytes in one ``np.memmap`` that only ``tensor_data`` touches. Dequantization
still goes through the ``gguf`` package (``weights.GGUFTensorReader``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpipe.errors import WeightsNotFoundError

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml types stored as plain numpy arrays; everything else is handed to dequantize as bytes.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
          28: np.float64}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    ggml_type: int
    data_offset_bytes: int  # from the start of the file


class GGUFFile:
    """``metadata`` (key -> Python value) and ``tensors`` (name -> GGUFTensorInfo) of one file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.stat().st_size < 4:  # np.memmap refuses an empty file
            raise WeightsNotFoundError(f"{str(self.path)!r} is not a GGUF file (too short)")
        self._mm = np.memmap(self.path, mode="r", dtype=np.uint8)
        self._buf = memoryview(self._mm)
        self._pos = 0
        if bytes(self._buf[:4]) != b"GGUF":
            raise WeightsNotFoundError(f"{str(self.path)!r} is not a GGUF file (bad magic)")
        try:
            self._read_header()
        except struct.error:  # a read past the end: the download stopped in the header
            raise WeightsNotFoundError(
                f"{str(self.path)!r} is a truncated GGUF file (its header ends early at "
                f"{len(self._mm)} bytes); download it again") from None

    def _read_header(self) -> None:
        self._pos = 4
        version, num_tensors, num_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise WeightsNotFoundError(f"{str(self.path)!r}: GGUF version {version}; hpipe reads 2 and 3")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            shape = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            infos.append((name, shape, self._unpack("<I"), self._unpack("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {name: GGUFTensorInfo(name, shape, t, data_start + off)
                        for name, shape, t, off in infos}
        if self.tensors:  # the last tensor in the file reaches its end: a cut download shows here
            self._end_byte(max(self.tensors.values(), key=lambda i: i.data_offset_bytes))

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        text = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            elem_type, count = self._unpack("<I"), self._unpack("<Q")
            if elem_type in _SCALARS:  # one bulk read for numeric arrays
                fmt = _SCALARS[elem_type]
                size = struct.calcsize(fmt)
                values = struct.unpack_from(f"<{count}{fmt[1]}", self._buf, self._pos)
                self._pos += size * count
                return list(values)
            return [self._value(elem_type) for _ in range(count)]
        raise WeightsNotFoundError(f"{str(self.path)!r}: unknown GGUF value type {vtype}")

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as ``gguf.dequantize`` expects them (a view of the memmap)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        rows_shape = tuple(reversed(info.shape))  # numpy order
        start, stop = info.data_offset_bytes, self._end_byte(info)
        if info.ggml_type in _PLAIN:
            return self._mm[start:stop].view(np.dtype(_PLAIN[info.ggml_type])).reshape(rows_shape)
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        byte_shape = (*rows_shape[:-1], rows_shape[-1] // block_size * type_size)
        return self._mm[start:stop].reshape(byte_shape)

    def _end_byte(self, info: GGUFTensorInfo) -> int:
        """One past the tensor's last byte, checked against the file's size."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        num_elems = int(np.prod(info.shape))
        if info.ggml_type in _PLAIN:
            num_bytes = num_elems * np.dtype(_PLAIN[info.ggml_type]).itemsize
        else:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
            num_bytes = num_elems // block_size * type_size
        stop = info.data_offset_bytes + num_bytes
        if stop > len(self._mm):
            raise WeightsNotFoundError(
                f"{str(self.path)!r} is a truncated GGUF file: tensor {info.name!r} ends at byte "
                f"{stop} but the file has {len(self._mm)}; download it again")
        return stop
