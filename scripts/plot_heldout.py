"""Held-out accuracy against step, read from run logs (`run.log`, or a console log of `reasoning-qat run`).

    python scripts/plot_heldout.py docs/results/w3g128/*.log --out docs/results/w3g128/heldout.png

`reasoning-qat report` draws the same figure from each stage's metrics.jsonl; this reads the lines
kd_qat logs at each held-out evaluation ("<stage>: step N: held-out accuracy P%"), for runs whose
artifacts did not come back (a remote GPU call returns logs more easily than artifact trees).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

LINE = re.compile(r"stages\.(?P<stage>[\w-]+): [\w-]+: step (?P<step>\d+): held-out accuracy (?P<acc>[\d.]+)%")


def read_curves(paths: list[Path]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, dict[int, float]] = {}
    for path in paths:
        for m in LINE.finditer(path.read_text(errors="replace")):
            curves.setdefault(m["stage"], {})[int(m["step"])] = float(m["acc"]) / 100
    return {stage: sorted(points.items()) for stage, points in curves.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="held-out accuracy during QAT")
    args = parser.parse_args()
    curves = read_curves(args.logs)
    if not curves:
        raise SystemExit(f"no held-out accuracy lines in {', '.join(map(str, args.logs))}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, points in curves.items():
        ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label=stage)
        print(stage, " ".join(f"{s}:{a:.3f}" for s, a in points))
    ax.set(xlabel="step", ylabel="held-out accuracy", title=args.title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
