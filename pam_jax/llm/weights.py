"""Streaming safetensors I/O and the HF <-> pam-jax key table for Qwen2.

The reader memory-maps a file and returns views, so nothing is read until a tensor is used; the
writer computes the header from shapes first and then writes one tensor at a time. Converting
or exporting therefore holds about one tensor in anonymous memory (the mapped source pages are
page cache the OS can drop), never a second copy of the model. BF16 is read and written through
`ml_dtypes.bfloat16` (a JAX dependency), so no torch is needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from pam_jax.checkpoint import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dt) -> str:
    try:
        return _NAMES[np.dtype(dt)]
    except KeyError:
        raise CheckpointError(f"dtype {dt} cannot be stored in safetensors") from None


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > 100_000_000:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._base = 8 + n
        self._mm = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self.header[key]["dtype"]
        if name not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {name}")
        return _DTYPES[name]

    def get(self, key: str) -> np.ndarray:
        """A read-only view of the tensor (pages are read on first touch)."""
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        b, e = self.header[key]["data_offsets"]
        buf = self._mm[self._base + b : self._base + e]
        return buf.view(self.dtype(key)).reshape(self.shape(key))


class TensorSource:
    """All tensors of a (possibly sharded) checkpoint, by key, lazily."""

    def __init__(self, files: Mapping[str, SafetensorsFile]):
        self.files = dict(files)  # key -> file

    @classmethod
    def from_dir(cls, d: str | os.PathLike, single: str = "model.safetensors") -> TensorSource:
        d = Path(d)
        index = d / (single + ".index.json")
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
            opened: dict[str, SafetensorsFile] = {}
            files = {}
            for k, fn in wm.items():
                if fn not in opened:
                    if not (d / fn).is_file():
                        raise CheckpointError(f"{index} names {fn}, which is missing from {d}")
                    opened[fn] = SafetensorsFile(d / fn)
                if k not in opened[fn].header:
                    raise CheckpointError(f"{index} maps {k} to {fn}, which does not hold it")
                files[k] = opened[fn]
            return cls(files)
        if (d / single).is_file():
            f = SafetensorsFile(d / single)
            return cls({k: f for k in f.keys()})
        others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = f" (found {others}: only safetensors checkpoints are supported)" if others else ""
        raise CheckpointError(f"{d} has no {single} or {single}.index.json{hint}")

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, k: str) -> tuple[int, ...]:
        return self.files[k].shape(k)

    def get(self, k: str) -> np.ndarray:
        return self.files[k].get(k)


def write_safetensors(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor: `produce(name)` is called once per entry,
    in order, and its result must have the declared dtype and shape."""
    entries = list(entries)
    header: dict = {}
    off = 0
    for name, dt, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {
            "dtype": dtype_name(dt),
            "shape": list(shape),
            "data_offsets": [off, off + nbytes],
        }
        off += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        from pam_jax.cliutil import progress

        for name, dt, shape in progress(entries, desc=f"writing {path.name}", unit="tensor"):
            arr = np.ascontiguousarray(produce(name))
            if arr.dtype != np.dtype(dt) or tuple(arr.shape) != tuple(shape):
                raise CheckpointError(
                    f"{name}: produced {arr.dtype}{arr.shape}, "
                    f"declared {np.dtype(dt)}{tuple(shape)}"
                )
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
    os.replace(tmp, path)
    return path


# ---- the key table ----------------------------------------------------------------------
# pam-jax (unrolled layers) key <-> HF key. Linear kernels are stored [in, out] (HF [out, in]).
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_key(nnx_key: str) -> tuple[str, bool]:
    """pam-jax key -> (HF key, transpose?)."""
    *parent, leaf = nnx_key.split(".")
    if leaf == "kernel":
        return ".".join([*parent, "weight"]), True
    if leaf == "embedding":
        return ".".join([*parent, "weight"]), False
    return nnx_key, False


def expected_params(cfg) -> dict[str, tuple[int, ...]]:
    """{pam-jax key (unrolled layers): shape} for a config, computed without building a model."""
    h, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.q_dim, cfg.kv_dim
    out = {"model.embed_tokens.embedding": (v, h), "model.norm.weight": (h,)}
    per = {
        "self_attn.q_proj.kernel": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.kernel": (h, kv),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.kernel": (h, kv),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.kernel": (q, h),
        "mlp.gate_proj.kernel": (h, m),
        "mlp.up_proj.kernel": (h, m),
        "mlp.down_proj.kernel": (m, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        for k, s in per.items():
            out[f"model.layers.{i}.{k}"] = s
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = (h, v)
    return out


def unrolled_key(scanned_key: str, layer: int) -> str:
    """`model.layers.self_attn.q_proj.kernel` (stacked) -> `model.layers.{layer}.self_attn...`."""
    assert scanned_key.startswith("model.layers.")
    return f"model.layers.{layer}.{scanned_key[len('model.layers.') :]}"
