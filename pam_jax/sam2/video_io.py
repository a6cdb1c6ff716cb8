"""Video frames for the SAM 2 video predictor, preprocessed as the official `load_video_frames`.

A JPEG folder is read like `sam2.utils.misc.load_video_frames_from_jpg_images`: files with a
.jpg/.jpeg extension, sorted by the integer value of their stem, each `PIL.Image.open(p)
.convert("RGB").resize((S, S))` (PIL bicubic on uint8), then `/ 255` (float64), float32, and
normalized with the ImageNet mean / std in float32: bit-identical to the official tensors.

An MP4 is decoded with PyAV or imageio when one is installed (optional; the official code uses
decord, whose own resize differs from PIL's, so MP4 input matches the official one only up to
that resize). The frames are kept resized as uint8 (4x smaller than float32) and normalized
when a frame is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

IMG_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMG_STD = np.array([0.229, 0.224, 0.225], np.float32)
JPEG_EXTS = (".jpg", ".jpeg", ".JPG", ".JPEG")


def preprocess_frame(frame, image_size: int) -> tuple[np.ndarray, int, int]:
    """A PIL image or uint8 [H, W, 3] array -> (resized uint8 [S, S, 3], height, width)."""
    from PIL import Image

    img = frame if isinstance(frame, Image.Image) else Image.fromarray(_as_uint8_rgb(frame))
    w, h = img.size
    resized = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.BICUBIC))
    return resized, h, w


def normalize(frames_u8: np.ndarray) -> np.ndarray:
    """uint8 [..., S, S, 3] -> float32, as official: x / 255 (float64), float32, (x - m) / s."""
    x = (np.asarray(frames_u8) / 255.0).astype(np.float32)
    return (x - IMG_MEAN) / IMG_STD


def _as_uint8_rgb(frame) -> np.ndarray:
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB images, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be [H, W, 3] RGB images, got shape {a.shape}")
    return a[..., :3]


# normalize() of every uint8 value per channel, [256, 3]: a lookup keeps the device-side
# normalization bit-identical to the official float64 / 255 then float32 arithmetic (XLA may
# rewrite the division as a multiplication, off by an ulp).
_LUT = normalize(np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1))


def normalize_device(frames_u8: jax.Array) -> jax.Array:
    """`normalize` inside jit, exactly (uint8 in, so 4x fewer bytes travel to the device)."""
    u8 = jnp.asarray(frames_u8).astype(jnp.int32)
    return jnp.asarray(_LUT)[u8, jnp.arange(3)]


class VideoFrames:
    """Resized uint8 frames of one video plus its original size; `frames[i]` is normalized
    float32 [S, S, 3]."""

    def __init__(self, frames_u8: np.ndarray, video_height: int, video_width: int):
        self.frames_u8 = frames_u8
        self.video_height = int(video_height)
        self.video_width = int(video_width)

    def __len__(self) -> int:
        return len(self.frames_u8)

    def __getitem__(self, i: int) -> np.ndarray:
        return normalize(self.frames_u8[i])

    @property
    def image_size(self) -> int:
        return self.frames_u8.shape[1]


def list_jpeg_frames(folder: str | os.PathLike) -> list[Path]:
    """The official frame order: JPEG files sorted by int(stem); clear errors otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"video {folder}: not a directory of JPEG frames nor an .mp4 file")
    names = [p for p in folder.iterdir() if p.suffix in JPEG_EXTS]
    if not names:
        raise ValueError(f"video folder {folder} holds no JPEG frames (*.jpg / *.jpeg)")
    bad = [p.name for p in names if not p.stem.isdigit()]
    if bad:
        raise ValueError(
            f"video folder {folder}: frame files must be named by their index "
            f"(e.g. 00000.jpg), got {bad[:3]}"
        )
    return sorted(names, key=lambda p: int(p.stem))


def load_video_frames(video: str | os.PathLike, image_size: int) -> VideoFrames:
    """A JPEG folder or an .mp4 file -> VideoFrames (see the module docstring)."""
    p = Path(video)
    if p.suffix.lower() == ".mp4":
        if not p.is_file():
            raise ValueError(f"video {p}: no such file")
        frames = list(iter_mp4_frames(p))
        if not frames:
            raise ValueError(f"video {p} has no frames")
        out, h, w = zip(*(preprocess_frame(f, image_size) for f in frames))
        return VideoFrames(np.stack(out), h[0], w[0])
    paths = list_jpeg_frames(p)
    from PIL import Image, UnidentifiedImageError

    out = np.zeros((len(paths), image_size, image_size, 3), np.uint8)
    size = None
    for i, fp in enumerate(paths):
        try:
            with Image.open(fp) as im:
                out[i], h, w = preprocess_frame(im, image_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"frame {fp} is not a readable image: {e}") from None
        if size is None:
            size = (h, w)
        elif (h, w) != size:
            raise ValueError(f"frame {fp} is {w}x{h}; the first frame is {size[1]}x{size[0]}")
    return VideoFrames(out, *size)


def iter_mp4_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decode an MP4 into uint8 RGB frames with PyAV, else imageio (optional dependencies)."""
    try:
        import av  # type: ignore[import-not-found]
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
        return
    try:
        import imageio.v3 as iio  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            f"reading {path} needs PyAV or imageio[pyav] (pip install av); neither is installed. "
            "Alternatively extract JPEG frames: ffmpeg -i video.mp4 -q:v 2 -start_number 0 "
            "DIR/'%05d.jpg'"
        ) from None
    for frame in iio.imiter(str(path)):
        yield _as_uint8_rgb(frame)


def iter_frames(source: str | os.PathLike | Iterable) -> Iterator[np.ndarray]:
    """Frames one at a time from a folder, an MP4 or any iterable of images (for streaming)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix.lower() == ".mp4":
            yield from iter_mp4_frames(p)
            return
        from PIL import Image

        for fp in list_jpeg_frames(p):
            with Image.open(fp) as im:
                yield np.asarray(im.convert("RGB"))
        return
    yield from source
