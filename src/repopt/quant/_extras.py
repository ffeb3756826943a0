"""Optional dependencies: one error type that names the pip extra to install, and a way to import quietly."""
from __future__ import annotations

import contextlib
import importlib
import logging
import warnings


class MissingExtraError(ImportError):
    """An optional dependency (a `repopt[...]` extra) is not installed."""


def require(module: str, extra: str, purpose: str, error: type[MissingExtraError] = MissingExtraError):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{purpose} needs {module.split('.')[0]}, which is not importable ({e}); install it with "
                    f"pip install 'repopt[{extra}]'.") from e


@contextlib.contextmanager
def quiet(*loggers: str, categories=(DeprecationWarning, FutureWarning)):
    """Silence log records below ERROR from `loggers`, and the given warning categories, for the duration: library
    chatter that says nothing about the user's model (deprecations inside torchao/torch.onnx, absent torchvision)."""
    logs = [logging.getLogger(n) for n in loggers]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for c in categories:
                warnings.simplefilter("ignore", c)
            yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
