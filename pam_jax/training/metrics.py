"""Model FLOPs, MFU and the run's logs (metrics.jsonl, eval.jsonl, TensorBoard, progress bar,
loss PNG).

Model FLOPs per step (the count MFU uses), over the model's stages in data-flow order, SAM 2
encoder -> SAM 2 decoder -> visual path (perceiver, projectors, newlines) -> LLM: a stage costs
6 x parameters x its tokens when it trains, 4 x when it is frozen but a stage before it trains
(gradients pass through it: forward 2 + input-gradient backward 2), 2 x otherwise (forward
only). Tokens:
- LLM: non-padding LLM positions (visual ones included); plus causal attention
  2 x 2 x layers x T^2 / 2 x q_dim per sequence (x3 / x2 / x1 likewise);
- visual path: the visual tokens it maps per sample;
- SAM 2 encoder and decoder: (S / 16)^2 per frame; a lower bound (Hiera's early stages run at
  stride 4 / 8).
The compiler's own count (`cost_analysis`) is reported beside it by `--compile-only`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

# datasheet dense bf16 peaks, FLOP/s per chip
PEAKS = {
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "v4": 275e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v5": 459e12,
    "v6 lite": 918e12,
    "v6e": 918e12,
}


def device_peak(device: jax.Device | None = None) -> float | None:
    """Datasheet bf16 peak of a device kind, or None when unknown (CPU)."""
    d = device or jax.devices()[0]
    kind = getattr(d, "device_kind", "").lower()
    for k in sorted(PEAKS, key=len, reverse=True):
        if k in kind:
            return PEAKS[k]
    return None


# the model's stages in data-flow order -> their train parts
STAGES = {
    "sam2_encoder": ("sam2_encoder",),
    "sam2_decoder": ("sam2_decoder",),
    "visual": ("perceiver", "projectors", "newlines"),
    "llm": ("llm",),
}


def model_flops(
    spec, positions: float, rows: int, seq_len: int, frames: int = 1, slots: int = 1
) -> float:
    """Model FLOPs of one optimizer step (see module docstring); `slots` samples per row (packed
    batches: SAM 2 and the perceiver run on every slot)."""
    pc = spec.config
    trained = {spec.parts[k] for k in spec.trainable}
    mult, before = {}, False  # stage -> 6 / 4 / 2 (module doc), in data-flow order
    for stage in STAGES:
        on = bool(trained & set(STAGES[stage]))
        mult[stage] = 6 if on else 4 if before else 2
        before |= on
    n = {st: spec.count([k for k in spec.keys if spec.parts[k] in STAGES[st]]) for st in STAGES}
    q = pc.llm.num_attention_heads * pc.llm.head_dim
    attn = 2 * 2 * pc.llm.num_hidden_layers * seq_len * seq_len / 2 * q * rows
    flops = mult["llm"] * (n["llm"] * positions + attn / 2)
    nvis = pc.video_embeds_len if frames > 1 else pc.image_embeds_len
    flops += mult["visual"] * n["visual"] * nvis * rows * slots
    sam_tokens = (pc.sam2.image_size // 16) ** 2 * frames * rows * slots
    flops += (
        mult["sam2_encoder"] * n["sam2_encoder"] + mult["sam2_decoder"] * n["sam2_decoder"]
    ) * sam_tokens
    return float(flops)


class RunLog:
    """metrics.jsonl + eval.jsonl + TensorBoard events + tqdm bar; `truncate(step)` drops
    metrics lines of steps >= step and eval lines of steps > step (a resume re-logs them, so
    each step appears once)."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, *, enabled: bool = True):
        self.dir = Path(workdir)
        self.enabled = enabled
        self.metrics_path = self.dir / "metrics.jsonl"
        self.eval_path = self.dir / "eval.jsonl"
        self.total = total_steps
        self._tb = None
        self._bar = None

    def truncate(self, step: int) -> None:
        if not self.enabled:
            return
        # a metrics line's step counts updates before its batch; an eval line's the updates
        # done (eval at `step` ran on the restored state itself, so it stays)
        for p, last in ((self.metrics_path, step - 1), (self.eval_path, step)):
            if p.is_file():
                keep = [ln for ln in p.read_text().splitlines() if ln.strip()
                        and json.loads(ln)["step"] <= last]  # fmt: skip
                p.write_text("".join(x + "\n" for x in keep))

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=step)
        self._bar = tqdm(total=self.total, initial=step, desc="train", dynamic_ncols=True)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        step = rec["step"]
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("mfu") is not None:
                post["mfu"] = f"{rec['mfu']:.1%}"
            if rec.get("truncated_total"):  # samples cut at model_max_length so far
                post["cut"] = str(rec["truncated_total"])
            self._bar.set_postfix(post)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log_eval(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.eval_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"eval/{k}", v, rec["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._bar = self._tb = None

    def plot(self) -> Path | None:
        """loss.png: training loss (and per-source and validation losses) over steps."""
        if not self.enabled or not self.metrics_path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        if not recs:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train")
        for name in sorted({k for r in recs for k in r if k.startswith("loss/")}):
            pts = [(r["step"], r[name]) for r in recs if r.get(name) is not None]
            ax.plot(*zip(*pts), label=name[5:], alpha=0.6)
        if self.eval_path.is_file():
            ev = [json.loads(x) for x in self.eval_path.read_text().splitlines() if x.strip()]
            ev = [e for e in ev if "val_loss" in e]
            if ev:
                ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        out = self.dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
