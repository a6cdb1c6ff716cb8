"""`seg_loss=W`: `pam_jax.training.loss.seg_loss_sums` equals SAM 2's training loss written from
its rules (sam2/training/loss_fns.py: 20 x sigmoid focal (alpha 0.25, gamma 2, mean over
pixels) + dice + L1 between the predicted and the actual IoU of the hard mask + object-score
BCE; mask, dice and IoU terms zeroed where the object is absent) in torch, on the decoder's
single-mask output, rows without a mask left out.

pam-jax compares at the decoder's resolution (the ground truth area-downsampled, > 0.5); SAM 2
upsamples the predictions instead: the reference takes the same downsampled masks. Tolerance
1e-5 relative (float32, sums in another order).
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from pam_jax.training.loss import seg_loss_sums


def _reference(logits, iou_pred, obj, gt, valid) -> float:
    x, t = torch.tensor(logits), torch.tensor(gt, dtype=torch.float32)
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).flatten(1).mean(1)
    dice = 1 - (2 * (p * t).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
    hard, g = (x > 0).flatten(1), (t > 0).flatten(1)
    iou = (hard & g).sum(1).float() / torch.clamp((hard | g).sum(1).float(), min=1.0)
    l1 = (torch.tensor(iou_pred) - iou).abs()
    present = g.any(1).float()
    cls = F.binary_cross_entropy_with_logits(torch.tensor(obj), present, reduction="none")
    per = present * (20 * focal + dice + l1) + cls
    return float((per * torch.tensor(valid, dtype=torch.float32)).sum())


def test_image_seg_loss_equals_sam2_rules():
    rs = np.random.RandomState(0)
    b, h, s = 4, 16, 64  # decoder masks 16 x 16; ground truth 64 x 64 (4 x 4 blocks)
    logits = (2 * rs.randn(b, h, h)).astype(np.float32)
    gt = np.zeros((b, 1, s, s), bool)
    gt[0, 0, 8:40, 4:30] = True
    gt[1, 0, 20:64, 0:50] = True
    gt[1, 0, 22:23, 3:9] = False  # partial blocks: the area rule decides
    # row 2: the object is absent (only the score term counts); row 3: no mask (left out)
    gt[3, 0, :32] = True
    has_mask = np.array([True, True, True, False])
    masks = np.zeros((b, 3, h, h), np.float32)
    masks[:, 0] = logits  # token 0 = the single mask; multimask tokens must be ignored
    masks[:, 1:] = 50.0
    iou_pred = rs.rand(b, 3).astype(np.float32)
    obj = rs.randn(b, 1).astype(np.float32)
    dec = types.SimpleNamespace(
        masks=jnp.asarray(masks), iou_pred=jnp.asarray(iou_pred),
        object_score_logits=jnp.asarray(obj),
    )  # fmt: skip
    mb = {
        "gt_masks": jnp.asarray(gt), "has_mask": jnp.asarray(has_mask),
        "mask_valid": jnp.ones((b, 1), bool),
    }  # fmt: skip
    total, rows = seg_loss_sums(types.SimpleNamespace(decoder=dec), mb)
    small = gt[:, 0].reshape(b, h, s // h, h, s // h).mean(axis=(2, 4)) > 0.5
    want = _reference(logits, iou_pred[:, 0], obj[:, 0], small, has_mask)
    assert float(rows) == 3
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # the absent object of row 2 contributes its score term only
    only2 = _reference(logits[2:3], iou_pred[2:3, 0], obj[2:3, 0], small[2:3], [True])
    bce = float(F.binary_cross_entropy_with_logits(torch.tensor(obj[2]), torch.zeros(1)))
    np.testing.assert_allclose(only2, bce, rtol=1e-6)
