"""Grader accuracy on the benchmarks' own reference solutions (the targets of issue 3).

    python bench/grading.py [--data-dir DIR] [--workers N] [--out results.json]

For every GSM8K test and MATH-500 problem: (1) the reference solution graded against its own gold
must be accepted (target >= 99.5%); (2) the same solutions paired with a shuffled gold: an accept
is a false accept unless the shuffled gold is itself equivalent to the true gold (small integers
recur, so about 1% of shuffled pairs truly match). Prints both, and the items that fail (1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.benchmarks import load_benchmark  # noqa: E402
from pipeline.data.grading import grade_many  # noqa: E402


def measure(name: str, data_dir: str | None, workers: int | None, seed: int) -> dict:
    problems = load_benchmark(name, data_dir=data_dir)
    solutions = [p.solution for p in problems]
    golds = [p.answer for p in problems]
    start = time.perf_counter()
    own = grade_many(zip(solutions, golds), workers=workers)
    seconds = time.perf_counter() - start
    shuffled = golds[:]
    random.Random(seed).shuffle(shuffled)
    accepted = grade_many(zip(solutions, shuffled), workers=workers)
    # Is the shuffled gold equivalent to the true one? Then accepting is right.
    same_gold = grade_many(((f"\\boxed{{{s}}}", g) for s, g in zip(shuffled, golds)), workers=workers)
    false_accepts = [i for i, (a, same) in enumerate(zip(accepted, same_gold)) if a and not same]
    return {
        "bench": name,
        "n": len(problems),
        "own_gold_accuracy": sum(own) / len(own),
        "own_gold_failures": [
            {"id": problems[i].id, "gold": golds[i], "solution_tail": solutions[i][-160:]}
            for i, ok in enumerate(own)
            if not ok
        ],
        "shuffled_accepts": sum(accepted),
        "shuffled_truly_equal": sum(same_gold),
        "false_accepts": len(false_accepts),
        "false_accept_ids": [problems[i].id for i in false_accepts],
        "seconds_own_gold": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default=None, help="benchmark jsonl directory (default: see pipeline.data.benchmarks)"
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = [measure(name, args.data_dir, args.workers, args.seed) for name in ("gsm8k", "math500")]
    total = sum(r["n"] for r in results)
    overall = sum(r["own_gold_accuracy"] * r["n"] for r in results) / total
    print(f"{'bench':<8} {'n':>5} {'own gold':>9} {'shuffled acc':>12} {'truly equal':>11} {'false acc':>9} {'s':>6}")
    for r in results:
        print(
            f"{r['bench']:<8} {r['n']:>5} {r['own_gold_accuracy']:>9.2%} {r['shuffled_accepts']:>12} "
            f"{r['shuffled_truly_equal']:>11} {r['false_accepts']:>9} {r['seconds_own_gold']:>6.1f}"
        )
    print(f"overall own-gold accuracy {overall:.2%} on {total} (target >= 99.50%)")
    for r in results:
        for f in r["own_gold_failures"]:
            print(f"  not accepted: {r['bench']} {f['id']} gold={f['gold']!r} tail={f['solution_tail']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "overall_own_gold_accuracy": overall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
