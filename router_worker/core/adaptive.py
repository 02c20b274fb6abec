"""Learned performance profiles for the ``adaptive`` strategy (seed 004), as pure functions.

A head's latency is modelled as ``a + b * size + c * load`` by least squares over its completion reports
(size: the job's ``metadata.batch_size``, else ``estimated_tokens``, else 1; load: in-flight / capacity when
the job started). The head's backend is constant per head, so the intercept carries it. Memory and power
are tracked as running means. Confidence grows with samples: ``n / (n + k)``, scaled by the fit's R².
The accumulator lives in the model-worker SDK, which publishes the fitted :class:`Profile` with its
heartbeat; routers only read profiles, so predicting costs a dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router_worker.core.model import Head
from schemas.envelope import Job

CONFIDENCE_K = 10.0


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int = 0
    coef: tuple[float, float, float] = (0.0, 0.0, 0.0)
    r2: float = 0.0
    memory_mb: float = 0.0
    power_w: float = 0.0

    @property
    def confidence(self) -> float:
        if self.samples < 3:
            return 0.0
        return (self.samples / (self.samples + CONFIDENCE_K)) * max(0.0, min(1.0, self.r2))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.samples,
            "coef": list(self.coef),
            "r2": self.r2,
            "mem": self.memory_mb,
            "pw": self.power_w,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        a, b, c = (float(x) for x in d.get("coef", (0.0, 0.0, 0.0)))
        return cls(int(d.get("n", 0)), (a, b, c), float(d.get("r2", 0.0)), float(d.get("mem", 0.0)),
                   float(d.get("pw", 0.0)))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Prediction:
    latency_ms: float
    throughput: float
    """Jobs per second the head can sustain at that latency and its capacity."""
    power_w: float
    confidence: float


def job_size(job: Job) -> float:
    meta = job.metadata or {}
    size = meta.get("batch_size")
    if isinstance(size, int | float) and not isinstance(size, bool) and size > 0:
        return float(size)
    if job.estimated_tokens:
        return float(job.estimated_tokens)
    return 1.0


def predict(profile: Profile | None, head: Head, load: float, size: float) -> Prediction:
    """Latency, throughput and power of ``head`` for a job of ``size`` at ``load``, with confidence."""
    if profile is None or profile.samples < 3:
        latency = head.latency_ms
        conf = 0.0
        power = profile.power_w if profile else head.power_w
    else:
        a, b, c = profile.coef
        # Never faster for being busier: a negative fitted load slope is noise, and would send more jobs to a
        # head the busier it got (and break the candidate heaps' rule that a score never rises with load).
        latency = max(0.01, a + b * size + max(0.0, c) * load)
        conf = profile.confidence
        power = profile.power_w or head.power_w
    throughput = head.capacity * 1000.0 / latency if latency > 0 else 0.0
    return Prediction(latency, throughput, power, conf)


@dataclass(slots=True)
class ProfileLearner:
    """Least-squares accumulator over (size, load) -> latency. Cheap to update, solved on demand."""

    n: int = 0
    xtx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])
    xty: list[float] = field(default_factory=lambda: [0.0] * 3)
    sum_y: float = 0.0
    sum_y2: float = 0.0
    mem_sum: float = 0.0
    power_sum: float = 0.0
    power_n: int = 0

    def observe(self, size: float, load: float, latency_ms: float, memory_mb: float = 0.0,
                power_w: float = 0.0) -> None:  # fmt: skip
        x = (1.0, size, load)
        for i in range(3):
            self.xty[i] += x[i] * latency_ms
            row = self.xtx[i]
            for j in range(3):
                row[j] += x[i] * x[j]
        self.n += 1
        self.sum_y += latency_ms
        self.sum_y2 += latency_ms * latency_ms
        self.mem_sum += memory_mb
        if power_w > 0:
            self.power_sum += power_w
            self.power_n += 1

    def profile(self) -> Profile:
        if self.n == 0:
            return Profile()
        coef = _solve(self.xtx, self.xty)
        if coef is None:  # degenerate features (e.g. constant size and load): fall back to the mean
            coef = (self.sum_y / self.n, 0.0, 0.0)
        # R² from the normal equations: SSE = y'y - 2 b'X'y + b'X'X b
        b = coef
        bxty = sum(b[i] * self.xty[i] for i in range(3))
        bxxb = sum(b[i] * self.xtx[i][j] * b[j] for i in range(3) for j in range(3))
        sse = max(0.0, self.sum_y2 - 2 * bxty + bxxb)
        sst = self.sum_y2 - self.sum_y * self.sum_y / self.n
        r2 = 1.0 - sse / sst if sst > 1e-9 else 1.0
        power = self.power_sum / self.power_n if self.power_n else 0.0
        return Profile(self.n, (b[0], b[1], b[2]), r2, self.mem_sum / self.n, power)


def _solve(a: list[list[float]], y: list[float]) -> tuple[float, float, float] | None:
    """Solve a 3x3 system with a tiny ridge term; None when singular. Gaussian elimination, pivoting."""
    m = [[*row, y[i]] for i, row in enumerate(a)]
    for i in range(3):
        m[i][i] += 1e-9
    # Drop features that never varied (a zero row beyond the ridge) by solving the reduced system.
    active = [i for i in range(3) if i == 0 or a[i][i] - (a[0][i] ** 2) / max(a[0][0], 1e-12) > 1e-9]
    k = len(active)
    sub = [[m[r][c] for c in active] + [m[r][3]] for r in active]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(sub[r][col]))
        if abs(sub[piv][col]) < 1e-12:
            return None
        sub[col], sub[piv] = sub[piv], sub[col]
        for r in range(k):
            if r != col:
                f = sub[r][col] / sub[col][col]
                for c in range(col, k + 1):
                    sub[r][c] -= f * sub[col][c]
    out = [0.0, 0.0, 0.0]
    for idx, feat in enumerate(active):
        out[feat] = sub[idx][k] / sub[idx][idx]
    return (out[0], out[1], out[2])
