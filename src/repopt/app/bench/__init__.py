"""Benchmarks of the performance claim (see docs/benchmarks.md): `run_suite()` measures, `format_report()` prints.

Modules: timing (interleaved medians, machine description), workloads (plain / repopt / repvgg built alike),
optimizer (step time, extra state), training (whole steps), memory (peak RSS of a fresh process), suite, report.
"""
from .report import format_report
from .suite import KEYS, TARGETS, SuiteConfig, TrainSetting, run_suite

__all__ = ["run_suite", "format_report", "SuiteConfig", "TrainSetting", "KEYS", "TARGETS"]
