"""Training data sources: each yields this process's rows of the next global batch as step
arrays (`batch.step_arrays`) and has a JSON-able `get_state()` / `set_state()` for exact
resume.

- `data=synthetic` (or `synthetic:video`): random samples of the real shapes
  (`batch.synthetic_batch`), batch i seeded by (seed, i); for benchmarks, compile checks and
  tests.
- anything else: `pam_jax.data.pipeline.make_dataset` (a prepared dataset directory, a mixture
  YAML, or a JSONL with `image_root`), sharded by process.

`last_truncated`: how many of the samples in this process's last batch were cut to fit
`model_max_length` (`pam_jax.data.preprocess.Example.truncated`; synthetic rows never are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pam_jax.training import batch as batch_lib
from pam_jax.training.config import ConfigError, TrainConfig


class SyntheticSource:
    def __init__(
        self, cfg: TrainConfig, pam_cfg, seq_len: int, process_index: int, process_count: int
    ):
        self.cfg, self.pam_cfg, self.seq_len = cfg, pam_cfg, seq_len
        self.video = cfg.data == "synthetic:video"
        self.pi, self.pc = process_index, process_count
        self.index = 0
        self.num_sources = 1
        self.last_truncated = 0

    @property
    def num_visual(self) -> int:
        return self.pam_cfg.video_embeds_len if self.video else self.pam_cfg.image_embeds_len

    def global_rows(self, index: int) -> dict[str, np.ndarray]:
        pc = self.pam_cfg
        return batch_lib.synthetic_batch(
            self.cfg.batch_size, self.seq_len, self.num_visual, pc.sam2.image_size,
            pc.llm.vocab_size, seed=self.cfg.seed * 1_000_003 + index,
            frames=pc.num_frames if self.video else 1, masks=self.cfg.seg_loss > 0,
        )  # fmt: skip

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.global_rows(self.index)
        self.index += 1
        n = self.cfg.batch_size // self.pc
        return {k: v[self.pi * n : (self.pi + 1) * n] for k, v in rows.items()}

    def get_state(self) -> dict[str, Any]:
        return {"kind": "synthetic", "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "synthetic":
            raise ConfigError("the checkpoint's data state is not from synthetic data")
        self.index = int(state["index"])


class PipelineSource:
    """`pam_jax.data.pipeline.make_dataset` batches as step arrays."""

    def __init__(self, cfg: TrainConfig, tokenizer, pam_cfg, seq_len: int, pi: int, pc: int):
        try:
            from pam_jax.data import pipeline
            from pam_jax.data.preprocess import PreprocessConfig
        except ImportError as e:
            raise ConfigError(f"data={cfg.data!r} needs pam_jax.data ({e})") from None
        if tokenizer is None:
            raise ConfigError(f"data={cfg.data!r} needs a tokenizer: use a model directory")
        pre = PreprocessConfig(
            image_size=pam_cfg.sam2.image_size,
            augment=cfg.augment,
            model_max_length=cfg.model_max_length,
            num_visual=pam_cfg.image_embeds_len,
            num_visual_video=pam_cfg.video_embeds_len,
            num_frames=pam_cfg.num_frames,
        )
        image_root = cfg.image_root or None
        entries = pipeline.parse_spec(cfg.data, image_root)
        self.source_names = [Path(e.path).stem for e in entries]
        self.it = iter(
            pipeline.make_dataset(
                cfg.data, tokenizer=tokenizer, cfg=pre, batch_size=cfg.batch_size // pc,
                seed=cfg.seed, shuffle=cfg.shuffle, augment=cfg.augment,
                process_index=pi, process_count=pc, image_root=image_root,
                seq_bucket=(seq_len,) if seq_len else 64,
                pack=cfg.pack, pack_max=cfg.pack_max,
            )
        )  # fmt: skip
        self.num_sources = len(entries)
        self.masks = cfg.seg_loss > 0
        self.seq_len = seq_len
        self.last_truncated = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self.it)
        self.last_truncated = int(np.count_nonzero(b.truncated))  # 0 on padding rows / slots
        return batch_lib.step_arrays(b, masks=self.masks)

    def get_state(self) -> dict[str, Any]:
        return {"kind": "pipeline", "iterator": self.it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "pipeline":
            raise ConfigError("the checkpoint's data state is not from a data pipeline")
        self.it.set_state(state["iterator"])


def make_source(cfg: TrainConfig, tokenizer, pam_cfg, seq_len: int, pi: int = 0, pc: int = 1):
    if not cfg.data:
        raise ConfigError("no training data: set data=DIR|MIXTURE.yaml|FILE.jsonl (or synthetic)")
    if cfg.batch_size % pc:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split over {pc} processes")
    if cfg.data.startswith("synthetic"):
        if cfg.data not in ("synthetic", "synthetic:video"):
            raise ConfigError(f"data={cfg.data!r}: synthetic data is 'synthetic' or "
                              "'synthetic:video'")  # fmt: skip
        return SyntheticSource(cfg, pam_cfg, seq_len, pi, pc)
    return PipelineSource(cfg, tokenizer, pam_cfg, seq_len, pi, pc)
