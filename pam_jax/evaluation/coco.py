"""The COCO-style benchmark files (`--format refcocog|vg|coco`): one JSON object with `images`
and `annotations`, one item per annotation, prompted by its box."""

from __future__ import annotations

from pathlib import Path

from pam_jax.evaluation.items import (
    FormatError,
    Item,
    Problem,
    _path,
    _reason,
    _refs,
    _text,
    xywh_to_box,
)


def _coco_like(data: dict, root: Path | None, task: str, fmt: str) -> tuple[list, list]:
    """refcocog / vg / coco: one item per annotation, prompted by its box."""
    images = data.get("images")
    anns = data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise FormatError("a COCO-style file needs 'images' and 'annotations' lists")
    by_id = {im.get("id"): im for im in images if isinstance(im, dict)}
    items, problems = [], []
    for i, a in enumerate(anns):
        where = f"annotation {i}"
        try:
            if not isinstance(a, dict):
                raise ValueError("not an object")
            im = by_id.get(a.get("image_id"))
            if im is None:
                raise ValueError(f"image_id {a.get('image_id')!r} is not in images")
            hw = (int(im["height"]), int(im["width"])) if "height" in im else None
            region = {"box": xywh_to_box(a["bbox"])}
            media = (_path(root, None, _text(im.get("file_name"), "file_name")),)
            aid = str(a["id"]) if a.get("id") is not None else str(i)
            if fmt == "coco":
                if a.get("segmentation") is None or hw is None:
                    raise ValueError("segmentation needs a segmentation and image height/width")
                item = Item(aid, "image", task, media, region, (), a["segmentation"], hw=hw,
                            where=where)  # fmt: skip
            else:
                src = a if ("caption" in a or "captions" in a) else im
                cap = src.get("captions", src.get("caption"))
                if cap is None:
                    raise ValueError("no caption on the annotation or its image")
                item = Item(aid, "image", task, media, region, _refs(cap, "caption"), hw=hw,
                            where=where)  # fmt: skip
            items.append(item)
        except (ValueError, KeyError, TypeError) as e:
            problems.append(Problem(where, _reason(e)))
    return items, problems
