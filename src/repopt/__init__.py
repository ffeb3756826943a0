"""repopt: gradient re-parameterization (RepOptimizer) for PyTorch.

Train a plain VGG-style conv net as if it were multi-branch, by putting the branch prior into the optimizer.
"""
from .branches import IDENTITY, BranchError, BranchSet, ConvGeometry
from .optim import RepOptAdamW, RepOptLion, RepOptSGD, param_groups
from .reinit import ReinitError, apply_rule_of_initialization
from .scales import Scales, ScalesError, load_scales, save_scales
from .search import extract_scales, to_hyper_search
from .convert import ConversionError, to_target
from .pretrained import InitError, InitReport, init_from
from . import models
from .targets import find_target_convs

__version__ = "0.1.0"

__all__ = [
    "BranchSet", "BranchError", "ConvGeometry", "IDENTITY", "RepOptSGD", "RepOptAdamW", "RepOptLion",
    "param_groups", "Scales", "ScalesError", "load_scales", "save_scales", "find_target_convs",
    "apply_rule_of_initialization", "ReinitError", "to_hyper_search", "extract_scales", "models", "to_target",
    "ConversionError", "init_from", "InitReport", "InitError",
]
