"""The statistics every results table of docs/results.md reports: mean and standard error over seeds, and paired
differences (same seed, same data order, same recipe) with their standard error and the count of wins."""
from __future__ import annotations

import statistics


def se(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than two values."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def mean_se(values: list[float]) -> str:
    """'87.12 ± 0.34' (mean ± standard error)."""
    return f"{statistics.mean(values):.2f} ± {se(values):.2f}"


def paired(a: list[float], b: list[float]) -> dict:
    """a - b seed by seed: mean, standard error, median, and in how many seeds a is ahead / tied / behind."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired differences need the same seeds on both sides, got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b)]
    return {"mean": statistics.mean(d), "se": se(d), "median": statistics.median(d), "n": len(d),
            "ahead": sum(v > 0 for v in d), "tied": sum(v == 0 for v in d), "behind": sum(v < 0 for v in d)}


def paired_cell(p: dict) -> str:
    """'+1.23 ± 0.45 (3/0/0)': mean difference ± its standard error (seeds ahead / tied / behind)."""
    return f"{p['mean']:+.2f} ± {p['se']:.2f} ({p['ahead']}/{p['tied']}/{p['behind']})"


def paired_line(name_a: str, name_b: str, p: dict) -> str:
    return (f"{name_a} - {name_b}, paired by seed: mean {p['mean']:+.2f} points (standard error {p['se']:.2f}), "
            f"median {p['median']:+.2f}; {name_a} ahead in {p['ahead']}, tied in {p['tied']}, behind in "
            f"{p['behind']} of {p['n']} seeds")
