"""Uploads checked by content (magic bytes, then the decoder), never by name, and decoded in
memory: no byte of a request reaches the file system. Images: PNG, JPEG, WebP, GIF, BMP (PIL,
EXIF orientation applied as `pam_jax.fileio.read_image` does); videos: MP4 / MOV and WebM / MKV
decoded by PyAV (the `video` / `serve` extra; Debian's ffmpeg libraries come in its wheel).
"""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np


class MediaError(ValueError):
    """An upload that is not what it must be; `status` is the HTTP answer (413 / 415)."""

    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096  # per image / video frame
    max_frames: int = 32  # a clip's frames beyond this are not decoded

    def __post_init__(self):
        if min(self.max_upload_bytes, self.max_pixels, self.max_frames) < 1:
            raise ValueError(f"limits must be positive, got {self}")


IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def sniff_image(data: bytes) -> str | None:
    """The image format the bytes start with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((f for magic, f in IMAGE_MAGIC.items() if data.startswith(magic)), None)


def sniff_video(data: bytes) -> str | None:
    if data[4:8] == b"ftyp":
        return "MP4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "WEBM"
    return None


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Upload bytes -> RGB uint8 [H, W, 3]; MediaError (415 / 413) otherwise."""
    from PIL import Image, ImageOps

    fmt = sniff_image(data)
    if fmt is None:
        raise MediaError(f"not an image: expected {', '.join(IMAGE_FORMATS)} (checked by content)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise MediaError(f"image is {w}x{h}, over the {limits.max_pixels} pixel limit", 413)
            im.verify()  # structure / checksums before the full decode
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except MediaError:
        raise
    except Exception as e:  # PIL raises many types on corrupt input
        raise MediaError(f"{fmt} image could not be decoded ({type(e).__name__})") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise MediaError("the image is empty")
    return rgb


def decode_video(data: bytes, limits: Limits) -> np.ndarray:
    """Upload bytes -> uint8 [T, H, W, 3], the first `limits.max_frames` frames."""
    if sniff_video(data) is None:
        raise MediaError("not a video: expected MP4 / MOV or WebM / MKV (checked by content)")
    try:
        import av
    except ImportError:
        raise MediaError("video uploads need PyAV (pip install 'pam-jax[serve]')", 501) from None
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            for frame in container.decode(video=0):
                if frame.width * frame.height > limits.max_pixels:
                    raise MediaError(
                        f"video is {frame.width}x{frame.height}, over the {limits.max_pixels} "
                        "pixel limit", 413,
                    )  # fmt: skip
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= limits.max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"video could not be decoded ({type(e).__name__})") from None
    if not frames:
        raise MediaError("the video has no frames")
    return np.stack(frames)


def png_bytes(image: np.ndarray) -> bytes:
    """A bool mask [H, W] (as 0 / 255 grey) or an RGB uint8 image as PNG bytes."""
    from PIL import Image

    arr = image.astype(np.uint8) * 255 if image.dtype == bool else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def mask_from_png_base64(text: str) -> np.ndarray:
    """The inverse of `png_base64` for masks (clients and tests)."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im.convert("L")) > 127
