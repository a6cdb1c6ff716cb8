"""Helpers to build the official PyTorch references with random, perturbed weights."""

from __future__ import annotations

import sys

import numpy as np


def perturb_(module, seed: int = 0, scale: float = 0.02) -> None:
    """Add scale * N(0, 1) to every parameter and buffer of float dtype, in place.

    Random init leaves many tensors at constants (LayerNorm 1/0, position embeddings 0,
    layer-scale gammas 1e-6) that would hide layout bugs; perturbing all of them exposes those.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tv_shim() -> None:
    """Let the PyPI (CUDA-built) torchvision import beside the CPU torch wheel.

    Only `SAM2ImagePredictor` needs torchvision (for its transforms); the shim defines the two
    op schemas whose absence makes `import torchvision` fail. See sam2.md section 6.3.
    """
    import torch

    global _TV_LIB
    if "_TV_LIB" in globals():
        return
    try:  # a working torchvision (the GPU machine's) registers these ops itself
        import torchvision  # noqa: F401

        _TV_LIB = None
        return
    except Exception:  # noqa: BLE001  (the CUDA wheel beside the CPU torch: ops missing)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    try:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass


def build_official_sam2(
    size: str = "t",
    version: str = "2.1",
    image_size: int = 1024,
    seed: int = 0,
    video: bool = False,
):
    """Official SAM2Base (or SAM2VideoPredictor) with random perturbed weights, eval mode."""
    import torch
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    names = {"t": "t", "s": "s", "b+": "b+", "l": "l"}
    folder = "sam2.1" if version == "2.1" else "sam2"
    cfg = f"configs/{folder}/{folder}_hiera_{names[size]}.yaml"
    extra = [f"++model.image_size={image_size}"] if image_size != 1024 else []
    torch.manual_seed(seed)
    builder = build_sam2_video_predictor if video else build_sam2
    m = builder(cfg, None, device="cpu", hydra_overrides_extra=extra)
    perturb_(m, seed)
    return m.eval()


def to_np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy()
