"""Named presets (installed as `pam_jax.configs`): one JSON file per preset.

    from pam_jax import configs
    configs.names()                   # ["pam-1.5b", "pam-3b", ..., "sam2_hiera_tiny"]
    cfg = configs.load("sam2.1_hiera_large")  # a SAM2Config / Qwen2Config / PAMConfig

Each file is {"kind": "sam2" | "qwen2" | "pam", "config": {...}}, the same config dictionaries
that a converted model directory's config.json holds. The files are generated from the code
presets by `python -m pam_jax.configs` and a test checks they agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DIR = Path(__file__).parent


def _presets() -> dict[str, tuple[str, Any]]:
    from pam_jax.llm import config as llm
    from pam_jax.pam import config as pam
    from pam_jax.sam2.config import OFFICIAL, sam2_config

    out: dict[str, tuple[str, Any]] = {
        name: ("sam2", sam2_config(size, version)) for name, (size, version) in OFFICIAL.items()
    }
    out["sam2.1_hiera_tiny-512"] = ("sam2", sam2_config("t", "2.1", 512))
    out["qwen2.5-1.5b"] = ("qwen2", llm.qwen2_5_1_5b())
    out["qwen2.5-3b"] = ("qwen2", llm.qwen2_5_3b())
    out["qwen2-tiny"] = ("qwen2", llm.tiny())
    out["pam-1.5b"] = ("pam", pam.pam_1_5b())
    out["pam-3b"] = ("pam", pam.pam_3b())
    return out


def names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.json"))


def load(name: str) -> Any:
    """The config object of a named preset."""
    path = _DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(names())}")
    meta = json.loads(path.read_text())
    kind, d = meta["kind"], meta["config"]
    if kind == "sam2":
        from pam_jax.sam2.config import SAM2Config

        return SAM2Config.from_dict(d)
    if kind == "qwen2":
        from pam_jax.llm.config import Qwen2Config

        return Qwen2Config.from_dict(d)
    if kind == "pam":
        from pam_jax.pam.config import PAMConfig

        return PAMConfig.from_dict(d)
    raise ValueError(f"{path}: unknown kind {kind!r}")


def write_all() -> list[Path]:
    """(Re)generate the JSON files from the code presets."""
    out = []
    for name, (kind, cfg) in _presets().items():
        path = _DIR / f"{name}.json"
        path.write_text(json.dumps({"kind": kind, "config": cfg.to_dict()}, indent=2) + "\n")
        out.append(path)
    return out
