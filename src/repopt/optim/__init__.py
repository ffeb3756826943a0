"""The RepOpt optimizers: torch.optim.Optimizer subclasses whose target convs train as their imaginary CSLA blocks."""
from .adamw import RepOptAdamW
from .groups import param_groups
from .lion import RepOptLion
from .sgd import RepOptSGD

__all__ = ["RepOptSGD", "RepOptAdamW", "RepOptLion", "param_groups"]
