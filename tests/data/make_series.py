"""Write tests/data/series.csv: a noisy seasonal series (deterministic; run to regenerate).

    load_t = 50 + 8 sin(2 pi t / 24) + 3 sin(2 pi t / 168) + a_t + e_t
    a_t = 0.8 a_(t-1) + N(0, 0.7^2)   (persistent weather-like drift)
    e_t ~ N(0, 1.5^2)                 (measurement noise)

An hourly "load" with a daily and a weekly cycle. Persistence (next = last) pays for the
measurement noise twice and for the daily swing; a model that filters the noise and tracks the
phase of the cycle does better. Other columns (a timestamp, a temperature) exercise `data.column`.
"""

from pathlib import Path

import numpy as np

N = 4000
OUT = Path(__file__).with_name("series.csv")


def main(path: Path = OUT) -> None:
    rng = np.random.default_rng(20240601)
    t = np.arange(N)
    a = np.zeros(N)
    for i in range(1, N):
        a[i] = 0.8 * a[i - 1] + rng.normal(0, 0.7)
    load = 50 + 8 * np.sin(2 * np.pi * t / 24) + 3 * np.sin(2 * np.pi * t / 168) + a \
        + rng.normal(0, 1.5, N)
    temp = 12 + 6 * np.sin(2 * np.pi * (t - 6) / 24) + rng.normal(0, 1.0, N)
    stamps = np.datetime64("2024-01-01T00:00") + t.astype("timedelta64[h]")
    lines = ["timestamp,temperature,load"]
    lines += [f"{s},{x:.2f},{y:.3f}" for s, x, y in zip(stamps.astype(str), temp, load, strict=True)]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
