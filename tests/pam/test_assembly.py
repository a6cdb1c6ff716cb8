"""Visual sequence layout (image 1042, video 5168 embeddings) and the text + visual splice."""

import jax.numpy as jnp
import numpy as np
import pytest

from pam_jax.llm.config import tiny
from pam_jax.pam import assembly
from pam_jax.pam.config import PAMConfig


def test_select_frames_release_formula():
    for n in (16, 17, 20, 32, 96):
        want = [0] + list(np.linspace(1, n - 1, 15, dtype=int))  # the release, verbatim
        np.testing.assert_array_equal(assembly.select_frames(n), want)
    # pam.md 8: a 20-frame video feeds frames 0,1,2,3,4,6,7,8,10,11,12,13,15,16,17,19
    np.testing.assert_array_equal(
        assembly.select_frames(20), [0, 1, 2, 3, 4, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 19]
    )


def test_select_frames_short_videos():
    for n in range(1, 16):
        idx = assembly.select_frames(n)
        assert len(idx) == 16 and idx[0] == 0
        assert set(idx.tolist()) == set(range(n))  # every frame used, repeats fill the rest
        assert np.all(np.diff(idx) >= 0)
        assert (idx == 0).sum() == (1 if n > 1 else 16)  # frame 0 dense once (n > 1)


def test_image_embeds_layout():
    b, h = 2, 8
    img = jnp.arange(b * 1024 * h, dtype=jnp.float32).reshape(b, 1024, h)
    sem = -jnp.arange(b * 16 * h, dtype=jnp.float32).reshape(b, 16, h) - 1
    inl, snl = jnp.full((h,), 0.5), jnp.full((h,), 0.25)
    out = assembly.image_embeds(img, sem, inl, snl)
    assert out.shape == (b, 1042, h) == (b, PAMConfig().image_embeds_len, h)
    np.testing.assert_array_equal(out[:, :1024], img)
    np.testing.assert_array_equal(out[:, 1024], np.full((b, h), 0.5))
    np.testing.assert_array_equal(out[:, 1025:1041], sem)
    np.testing.assert_array_equal(out[:, 1041], np.full((b, h), 0.25))


def test_video_embeds_layout():
    h, f = 4, 16
    dense = jnp.ones((1024, h))
    sparse = 2 + jnp.arange(f - 1, dtype=jnp.float32)[:, None, None] * jnp.ones((f - 1, 256, h))
    sem = 100 + jnp.arange(f, dtype=jnp.float32)[:, None, None] * jnp.ones((f, 16, h))
    nls = [jnp.full((h,), v) for v in (-1.0, -2.0, -3.0)]
    out = np.asarray(assembly.video_embeds(dense, sparse, sem, *nls))
    assert out.shape == (5168, h) == (PAMConfig().video_embeds_len, h)
    # explicit expected sequence, frame by frame as the release's Python loop builds it
    want = [
        np.ones((1024, h)),
        np.full((1, h), -1),
        np.full((16, h), 100),
        np.full((1, h), -2),
        np.full((1, h), -3),
    ]
    for i in range(1, f):
        want += [
            np.full((256, h), 2 + i - 1),
            np.full((1, h), -1),
            np.full((16, h), 100 + i),
            np.full((1, h), -2),
            np.full((1, h), -3),
        ]
    np.testing.assert_array_equal(out, np.concatenate(want))


@pytest.mark.parametrize("side", ["left", "right"])
def test_layout_and_assemble(side):
    before = [[5, 6, 7], [8]]
    after = [[9, 10], [11, 12, 13, 14]]
    v = 4
    lay = assembly.layout(before, after, v, pad_side=side)
    assert lay.lengths.tolist() == [9, 9]
    lay = assembly.layout(before, after, v, pad_to=11, pad_side=side)
    h = 3
    table = jnp.arange(20 * h, dtype=jnp.float32).reshape(20, h)  # token id t -> [3t, 3t+1, 3t+2]
    visual = 1000 + jnp.arange(2 * v * h, dtype=jnp.float32).reshape(2, v, h)
    out = np.asarray(assembly.assemble(table[lay.text_ids], visual, lay))
    for i in range(2):
        want = np.concatenate(
            [np.asarray(table)[before[i]], np.asarray(visual[i]), np.asarray(table)[after[i]]]
        )
        n = len(want)
        sl = slice(11 - n, 11) if side == "left" else slice(0, n)
        np.testing.assert_array_equal(out[i, sl], want)
        assert not out[i][~lay.mask[i]].any()  # padding is zero
        np.testing.assert_array_equal(lay.positions[i, sl], np.arange(n))
    with pytest.raises(ValueError, match="does not fit"):
        assembly.layout(before, after, v, pad_to=5)


def test_image_prompt_length_1042_plus_text():
    """An image prompt: text before + 1042 visual embeddings + text after (pam.md 1.1/8)."""
    from pam_jax.pam import prompts
    from tests.pam.test_prompts import byte_tokenizer

    before, after = prompts.prompt_ids(byte_tokenizer(), "recognize")
    cfg = PAMConfig(llm=tiny())
    lay = assembly.layout([before], [after], cfg.image_embeds_len)
    assert lay.lengths[0] == len(before) + 1042 + len(after)
    assert lay.is_visual.sum() == 1042
