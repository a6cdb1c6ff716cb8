"""`pam-jax convert sam2 CKPT.pt OUT_DIR [--image-size N]`: official SAM 2 / 2.1 checkpoints.

An official checkpoint is `torch.save({"model": state_dict})` of `SAM2Base`. The size (tiny /
small / base_plus / large) is read from the Hiera trunk (patch-embed width, number of blocks,
background position-embedding size), the version from the three tensors only 2.1 has
(`no_obj_embed_spatial`, `obj_ptr_tpos_proj.{weight,bias}`). pam-jax's `SAM2Base` names every
module like the official one, so the mapping is the generic one of `torch_nnx`: it fails listing
every unknown, missing or misshapen key and never fills a value.

torch is needed only here (`pip install 'pam-jax[convert]'`) and is imported lazily.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.checkpoint import CheckpointError, read_model_config, save_model_dir
from pam_jax.sam2.config import HIERA, SIZE_NAMES, SAM2Config, sam2_config

KIND = "sam2"
_TRUNK = "image_encoder.trunk."
_PATCH = _TRUNK + "patch_embed.proj.weight"
_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
# Tensors that exist only in SAM 2.1 checkpoints.
V21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias")


def _import_torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "converting a SAM 2 checkpoint needs PyTorch to read the .pt file: "
            "pip install 'pam-jax[convert]'"
        ) from None
    return torch


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_state_dict(ckpt_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read `{"model": state_dict}` with `torch.load(weights_only=True)` into numpy arrays.

    Raises CheckpointError (one line) for a missing, truncated or corrupt file, a pickle that is
    not a dict, a dict without "model", or a "model" that is not a tensor mapping.
    """
    p = Path(ckpt_path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    torch = _import_torch()
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here (RuntimeError, EOFError, Unpickling...)
        raise CheckpointError(
            f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{p} holds a {type(obj).__name__}, not a SAM 2 checkpoint "
            '(expected a dict {"model": state_dict})'
        )
    if "model" in obj:
        sd = obj["model"]
    elif _PATCH in obj:  # a bare state dict: accept it, it is unambiguous
        sd = obj
    else:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(
            f'{p} has no "model" entry, so it is not an official SAM 2 checkpoint '
            f"(top-level keys: {keys or 'none'})"
        )
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f'{p}: "model" is a {type(sd).__name__}, not a state dict')
    out = {}
    bad = []
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            bad.append(str(k))
            continue
        t = v.detach().cpu()
        out[str(k)] = (t.float() if t.is_floating_point() else t).numpy()
    if bad:
        raise CheckpointError(f"{p}: state dict entries that are not tensors: {bad[:10]}")
    return out


def detect_config(state_dict: Mapping[str, Any], image_size: int = 1024) -> SAM2Config:
    """The SAM2Config of an official state dict (size and version), at `image_size`."""
    if _PATCH not in state_dict:
        some = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"not a SAM 2 state dict: no {_PATCH!r} (first keys: {some})")
    embed_dim = int(np.shape(state_dict[_PATCH])[0])
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    pos = state_dict.get(_TRUNK + "pos_embed")
    bkg = tuple(int(s) for s in np.shape(pos)[-2:]) if pos is not None else None
    size = None
    for name, h in HIERA.items():
        if h.embed_dim == embed_dim and sum(h.stages) == n_blocks:
            size = name
    if size is None:
        known = ", ".join(
            f"{SIZE_NAMES[n]} {h.embed_dim}/{sum(h.stages)}" for n, h in HIERA.items()
        )
        raise CheckpointError(
            f"not a known SAM 2 size: trunk embed dim {embed_dim} with {n_blocks} blocks "
            f"(known embed dim / blocks: {known})"
        )
    if bkg is not None and bkg != HIERA[size].window_pos_embed_bkg_spatial_size:
        raise CheckpointError(
            f"{SIZE_NAMES[size]} trunk with a {bkg} background position embedding, expected "
            f"{HIERA[size].window_pos_embed_bkg_spatial_size}"
        )
    version = "2.1" if any(k in state_dict for k in V21_KEYS) else "2.0"
    try:
        return sam2_config(size, version, image_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


@functools.lru_cache(maxsize=4)
def abstract_sam2(cfg: SAM2Config):
    """The SAM2Base of `cfg` with shapes only (nnx.eval_shape: no parameter is allocated)."""
    from flax import nnx

    from pam_jax.sam2.model import SAM2Base

    return nnx.eval_shape(lambda: SAM2Base(cfg, rngs=nnx.Rngs(0)))


def map_state_dict(
    cfg: SAM2Config, state_dict: Mapping[str, Any], what: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """{nnx key: array} for `cfg`'s SAM2Base; CheckpointError lists every mismatching key."""
    from pam_jax.convert.torch_nnx import torch_to_nnx_params

    return torch_to_nnx_params(abstract_sam2(cfg), state_dict, what=what)


def convert_sam2(
    ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, image_size: int = 1024
) -> Path:
    """Convert an official SAM 2 / 2.1 `.pt` into a pam-jax model directory; returns it."""
    sd = load_state_dict(ckpt_path)
    cfg = detect_config(sd, image_size)
    params = map_state_dict(cfg, sd, what=str(ckpt_path))
    del sd
    return save_model_dir(
        out_dir, KIND, cfg.to_dict(), params,
        extra={"source": os.path.basename(str(ckpt_path))},
    )  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sam2",
        help="an official SAM 2 / 2.1 .pt checkpoint",
        description="Convert an official SAM 2 or SAM 2.1 checkpoint (any of the 8 sizes; "
        "size and version are detected) into a pam-jax model directory.",
    )
    p.add_argument(
        "ckpt", metavar="CKPT.pt",
        help="official checkpoint ({'model': state_dict}); with --export the model directory",
    )  # fmt: skip
    p.add_argument(
        "out_dir", metavar="OUT_DIR", help="model directory to write; with --export the .pt"
    )
    p.add_argument(
        "--export", action="store_true",
        help="inverse direction: pam-jax SAM 2 model dir -> official .pt ({'model': state_dict})",
    )  # fmt: skip
    p.add_argument(
        "--image-size", type=int, default=1024, metavar="N",
        help="model input size, a multiple of 32 (the official config's image_size; "
        "default 1024)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    return p


def run(args: argparse.Namespace) -> int:
    from pam_jax.cliutil import atomic_dir, check_new_dir

    if args.export:
        from pam_jax.convert.export_pam import export_sam2

        print(f"wrote {export_sam2(args.ckpt, args.out_dir, force=args.force)}")
        return 0
    check_new_dir(args.out_dir, force=args.force)  # before reading the checkpoint
    with atomic_dir(args.out_dir, force=args.force) as tmp:
        convert_sam2(args.ckpt, tmp, args.image_size)
    cfg = SAM2Config.from_dict(read_model_config(args.out_dir, KIND)["config"])
    print(f"wrote {args.out_dir} ({cfg.name}, SAM {cfg.version}, image size {cfg.image_size})")
    return 0
