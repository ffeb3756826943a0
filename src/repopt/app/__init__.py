"""The application layer: the `repopt` command, the trainer, run directories and benchmarks.

It is built on the library (repopt.branches, optim, scales, search, models, quant, data) and the library never
imports it.
"""
