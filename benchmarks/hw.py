"""The card's own limits, measured in the same run as the benchmark that reports against them.

Every benchmark reports fractions against two ceilings: what this card does in this run (a large
bf16 matmul and a device-to-device copy, timed here) and the vendor's datasheet for the card's
name. Nothing is assumed from another card: an H100 constant on an H200 (989 TFLOP/s is the same,
but 3.0 vs 4.8 TB/s is not) would overstate how close a memory-bound kernel is to its floor.

    from hw import card_limits
    lim = card_limits()            # measures once per process (about 1 s on a GPU)
    lim.matmul_flops, lim.copy_bytes_s, lim.datasheet_flops, lim.datasheet_bytes_s
"""

from __future__ import annotations

import dataclasses
import functools
import time

# Dense bf16 FLOP/s and HBM bytes/s from the vendors' datasheets (SXM parts), by a substring of
# JAX's `device_kind`. Longest match wins ("H100 PCIe" before "H100").
DATASHEET: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
    "L4": (121e12, 0.3e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5e": (197e12, 0.819e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v5": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "TPU v6e": (918e12, 1.64e12),
}


@dataclasses.dataclass(frozen=True)
class CardLimits:
    """Measured and datasheet ceilings of device 0. `None` where unknown (e.g. on a CPU)."""

    name: str
    platform: str
    matmul_flops: float  # measured bf16 n^3 matmul, FLOP/s: the faster of JAX's and PyTorch's
    copy_bytes_s: float  # measured device-to-device copy, bytes read + written per second
    datasheet_flops: float | None
    datasheet_bytes_s: float | None
    matmul_n: int
    matmul_flops_jax: float
    matmul_flops_torch: float | None  # None where PyTorch has no GPU here

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        ds = (
            f"datasheet {self.datasheet_flops / 1e12:.0f} TFLOP/s, "
            f"{self.datasheet_bytes_s / 1e12:.2f} TB/s"
            if self.datasheet_flops
            else "datasheet unknown"
        )
        pt = "-" if self.matmul_flops_torch is None else f"{self.matmul_flops_torch / 1e12:.3g}"
        return (
            f"{self.name} ({self.platform}): measured bf16 matmul {self.matmul_flops / 1e12:.3g} "
            f"TFLOP/s (n={self.matmul_n}; JAX {self.matmul_flops_jax / 1e12:.3g}, PyTorch {pt}), "
            f"copy {self.copy_bytes_s / 1e12:.3g} TB/s; {ds}"
        )


def datasheet(device_kind: str) -> tuple[float, float] | tuple[None, None]:
    hits = [k for k in DATASHEET if k.lower() in device_kind.lower()]
    if not hits:
        return None, None
    return DATASHEET[max(hits, key=len)]


def _median_s(f, reps: int, inner: int) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls (one sync at the end, so
    dispatch overlaps the device work), after a warm-up long enough for the clocks to ramp."""
    f().block_until_ready()  # compile
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        f().block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner - 1):
            f()
        f().block_until_ready()
        ts.append((time.perf_counter() - t) / inner)
    ts.sort()
    return ts[len(ts) // 2]


def _torch_matmul_flops(n: int, reps: int) -> float | None:
    """The same product through PyTorch (cuBLAS), timed with CUDA events: the peer's ceiling."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            a @ b
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3 / 20)
    ts.sort()
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / ts[len(ts) // 2]


@functools.cache
def card_limits(small: bool = False) -> CardLimits:
    """Time an n^3 bf16 matmul (n = 8192, or 1024 with `small`) and a copy of 2 GiB (32 MiB)."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    n = 1024 if small or dev.platform == "cpu" else 8192
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    reps = 3 if small else 10
    t_mm = _median_s(lambda: mm(a, b), reps, 1 if small else 20)

    nbytes = (32 << 20) if small or dev.platform == "cpu" else (2 << 30)
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    cp = jax.jit(lambda v: v + 1.0)  # one read and one write of every element, no fusion away
    t_cp = _median_s(lambda: cp(x), reps, 1 if small else 20)
    flops, bw = datasheet(dev.device_kind)
    f_jax = 2 * n**3 / t_mm
    f_torch = _torch_matmul_flops(n, reps) if dev.platform == "gpu" else None
    return CardLimits(
        name=dev.device_kind,
        platform=dev.platform,
        matmul_flops=max(f_jax, f_torch or 0.0),
        matmul_flops_jax=f_jax,
        matmul_flops_torch=f_torch,
        copy_bytes_s=2 * nbytes / t_cp,
        datasheet_flops=flops,
        datasheet_bytes_s=bw,
        matmul_n=n,
    )


if __name__ == "__main__":
    print(card_limits().line())
