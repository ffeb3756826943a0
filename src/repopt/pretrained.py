"""`repopt.init_from(model, source)`: start a plain (target) model from trained weights, for fine-tuning.

The sources, in the forms they are found in:
- a repopt run: its directory (its finished `model.safetensors`, else its last `checkpoint.pt`) or that file;
- a reference RepOpt-VGG checkpoint as the paper's repository releases it (`.pth`): its target model's names are
  repopt's (`stage0.conv`, `stageK.i.conv`, `stageK.i.bn`, `linear`), so it loads one-to-one into repopt_vgg_*; a
  `model` / `state_dict` wrapper and a `module.` prefix (DDP) are taken off;
- a multi-branch RepVGG-style state dict (repopt's own repvgg runs, the reference's repvgg mode, timm's RepVGG /
  MobileOne for `timm:NAME`): loaded into the model's multi-branch twin and fused by `repopt.to_target`, the same
  algebra (MATH (1)) as everywhere else, so the plain model computes what the multi-branch one computed in eval mode
  (in training mode the one BatchNorm after each fused conv normalizes by batch statistics, which the per-branch
  BatchNorms did branch by branch: no single conv-BN reproduces that, see convert.py; fine-tuning starts from it);
- any state dict (safetensors, a torch file, or a dict in memory) whose keys are the model's.

A classifier of another size (the model's declared head, else its last Linear) is left as the model built it (fresh,
for the new classes) and reported; any other missing, unexpected or misshapen key is refused in one sentence naming
the file and the first keys. Torch files are read with `weights_only=True` only: a pickle that asks to run code is
refused before anything of it runs. Nothing in the model changes unless the whole file fits.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# The files of a repopt run directory (repopt.app writes them; the library reads them here).
MODEL = "model.safetensors"    # a finished run's weights, with its training config in the metadata
CHECKPOINT = "checkpoint.pt"   # the last epoch's checkpoint (an unfinished run): its "model" entry holds the weights
MODEL_FORMAT = "repopt-model"  # the `format` metadata of MODEL
_WRAPPERS = ("model", "state_dict")  # the reference code's (Swin-style) and timm's / Lightning's checkpoint entries
# The reference code saves its yacs config object beside the weights in every checkpoint (utils.save_checkpoint). It is
# a dict subclass: read as a plain OrderedDict, so that no yacs code is imported or run and the file still loads.
_AS_DATA = [(OrderedDict, "yacs.config.CfgNode")]
_SHOWN = 3  # keys named in an error


class InitError(ValueError):
    """Weights that cannot start this model: an unreadable or refused file, or keys that do not fit."""


class FusedWeightsError(InitError):
    """Plain (fused) weights for a multi-branch model: a fused conv cannot be split back into its branches."""


@dataclass(frozen=True)
class HeadChange:
    """The classifier that was not loaded: `old` the file's (out, in) shape, `new` the model's fresh one."""

    name: str
    old: tuple[int, ...]
    new: tuple[int, ...]


@dataclass(frozen=True)
class InitReport:
    kind: str                      # "repopt run", "torch file", "safetensors file" or "state dict in memory"
    path: str | None               # the file read (None for a dict in memory)
    tensors: int                   # how many tensors were copied into the model
    head: HeadChange | None = None  # the replaced classifier, if any
    fused: tuple[str, ...] = ()    # the multi-branch blocks fused into plain convs, if any
    notes: tuple[str, ...] = field(default_factory=tuple)  # wrappers taken off, the run's method, ...

    def describe(self) -> str:
        """What was loaded, in one line."""
        where = f" {self.path}" if self.path else ""
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        fused = f", {len(self.fused)} multi-branch blocks fused into plain convs" if self.fused else ""
        return f"loaded {self.tensors} tensors from {self.kind}{where}{notes}{fused}"

    def describe_head(self) -> str | None:
        """The replaced classifier in one line, or None."""
        if self.head is None:
            return None
        h = self.head
        return (f"classifier {h.name} {tuple(h.old)} of the file does not fit {h.new[0]} classes: replaced by a "
                f"fresh {tuple(h.new)}")


def run_model_file(directory: str | os.PathLike) -> Path | None:
    """The file that holds a run directory's weights: its finished model, else its last checkpoint; None if neither."""
    for name in (MODEL, CHECKPOINT):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


# ---- reading -----------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    kind: str
    path: str | None
    state: dict[str, Tensor]
    config: dict | None = None
    notes: list[str] = field(default_factory=list)


def _read_safetensors(path: Path) -> _Source:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InitError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != MODEL_FORMAT:
        return _Source("safetensors file", str(path), state)
    try:
        config = json.loads(meta.get("config", "null"))
    except ValueError:
        config = None
    return _Source("repopt run", str(path), state, config if isinstance(config, dict) else None)


def _read_torch(path: Path) -> _Source:
    from ._io import load_error_message

    try:
        with torch.serialization.safe_globals(_AS_DATA):
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never weights_only=False (docstring)
    except Exception as e:  # code in the pickle, a truncated zip, foreign bytes, ...
        raise InitError(load_error_message(path, e, "PyTorch checkpoint")) from None
    config = obj.get("config") if isinstance(obj, Mapping) else None
    if isinstance(config, Mapping) and {"method", "arch"} <= set(config) and isinstance(obj.get("model"), Mapping):
        # a repopt training checkpoint (an unfinished run)
        return _Source("repopt run", str(path), dict(obj["model"]), dict(obj["config"]), ["its last checkpoint"])
    notes = []
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj, notes = obj[key], [f"its {key!r} entry"]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise InitError(f"{path}: expected a state dict (or one under 'model' / 'state_dict'), found "
                        f"{type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}")
    return _Source("torch file", str(path), dict(obj), None, notes)


def _read(source) -> _Source:
    from ._io import is_safetensors

    if isinstance(source, Mapping):
        src = _Source("state dict in memory", None, dict(source))
    else:
        path = Path(source)
        if path.is_dir():
            file = run_model_file(path)
            if file is None:
                raise InitError(f"{path}: a directory without {MODEL} or {CHECKPOINT}, so not a repopt run")
            path = file
        elif not path.is_file():
            raise InitError(f"{path}: no such file or run directory")
        src = _read_safetensors(path) if is_safetensors(path) else _read_torch(path)
    where = src.path or "the state dict"
    bad = next((k for k, v in src.state.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise InitError(f"{where}: entry {bad!r} is not a named tensor, so this is not a state dict")
    if src.state and all(k.startswith("module.") for k in src.state):  # saved from a DDP-wrapped model
        src.state = {k[len("module."):]: v for k, v in src.state.items()}
        src.notes.append("'module.' prefix removed")
    if src.config and src.config.get("method"):
        src.notes.insert(0, f"{src.config.get('arch', '?')}, method {src.config['method']}")
    return src


# ---- matching ----------------------------------------------------------------------------------------------------
def classifier_name(model: nn.Module) -> str | None:
    """The model's classifier: the one its (timm) config declares, else its last nn.Linear; None if it has none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    declared = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    modules = dict(model.named_modules())
    if isinstance(declared, str) and isinstance(modules.get(declared), nn.Linear):
        return declared
    return next((n for n, m in reversed(modules.items()) if isinstance(m, nn.Linear)), None)


def _head_keys(head: str | None) -> tuple[str, ...]:
    return (f"{head}.weight", f"{head}.bias") if head else ()


def _mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], head: str | None) -> str | None:
    """Why `state` cannot load into a model with state dict `expected` (its head may differ in shape), or None."""
    def first(keys):
        keys = sorted(keys)
        more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
        return ", ".join(keys[:_SHOWN]) + more

    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    shapes = [k for k in set(expected) & set(state)
              if k not in _head_keys(head) and tuple(expected[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"the model's {first(missing)} {'is' if len(missing) == 1 else 'are'} not in it")
    if unexpected:
        parts.append(f"it has {first(unexpected)}, which the model lacks")
    if shapes:
        k = sorted(shapes)[0]
        parts.append(f"{k} is {tuple(state[k].shape)} in it but {tuple(expected[k].shape)} in the model"
                     + (f" ({len(shapes) - 1} more of another shape)" if len(shapes) > 1 else ""))
    return "; ".join(parts) or None


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _is_multi_branch(model: nn.Module) -> bool:
    from .convert import CONVERTERS, _key

    return any(_key(m) in CONVERTERS for m in model.modules())


def _multi_branch_twin(model: nn.Module, classes: int) -> nn.Module | None:
    """The training-time multi-branch form of a plain model repopt built (RepOpt-VGG in target mode, a timm model made
    plain by to_target), with `classes` outputs, or None when it has none."""
    from .integrations import timm as timm_models
    from .models.vgg import RepOptVGG

    if isinstance(model, RepOptVGG) and model.mode == "target":
        return RepOptVGG(model.config, mode="repvgg", num_classes=classes, in_channels=model.stage0.conv.in_channels,
                         arch=model.arch)
    arch = getattr(model, "arch", None)
    if timm_models.is_timm_arch(arch) and not _is_multi_branch(model):
        conv = _first_conv(model)
        try:
            return timm_models.create(arch, mode="repvgg", num_classes=classes,
                                      **({"in_chans": conv.in_channels} if conv is not None else {}))
        except timm_models.TimmError:
            return None
    return None


def _head_rows(state: Mapping[str, Tensor], head: str | None, default: int) -> int:
    w = state.get(f"{head}.weight") if head else None
    return int(w.shape[0]) if w is not None and w.dim() == 2 else default


def _fuse(twin: nn.Module, state: Mapping[str, Tensor], where: str) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Load `state` into the multi-branch `twin` and fuse it with to_target: (the plain state dict, fused blocks)."""
    from .convert import CONVERTERS, ConversionError, _key, to_target

    twin.load_state_dict(state)
    fused = tuple(n for n, m in twin.named_modules() if _key(m) in CONVERTERS)
    try:
        plain = to_target(twin.eval())
    except ConversionError as e:
        raise InitError(f"{where}: its multi-branch weights cannot be fused: {e}") from None
    return plain.state_dict(), fused


# ---- the entry point ---------------------------------------------------------------------------------------------
@torch.no_grad()
def init_from(model: nn.Module, source, *, num_classes: int | None = None) -> InitReport:
    """Copy the trained weights of `source` into `model` (in place) and say what was done.

    model: the model to fine-tune, built as usual (a plain target model for RepOpt and plain training; the multi-branch
        model for a RepVGG-style baseline, which then takes multi-branch weights unfused).
    source: a repopt run directory or model file, a `.pth` / `.pt` torch file (read weights-only), a safetensors state
        dict, or a state dict in memory.
    num_classes: the classes of the new task. When the classifier (loaded, or the model's own) has another number of
        outputs, it is replaced by a fresh nn.Linear; None keeps the model's classifier size (the model was built for
        the new classes: a file's classifier of another size is then not loaded).
    Raises InitError (a ValueError) naming the file and the first keys that do not fit; the model is then unchanged.
    Neither the rule of initialization nor anything else is applied: RepOpt fine-tuning keeps these weights
    (`RepOptSGD.from_scales(..., reinit=False)`). The modules built on the way (a multi-branch twin, a fresh head) draw
    from a forked random stream: the caller's stays as it was, so a run's later draws do not depend on the source.
    """
    with torch.random.fork_rng(devices=[]):
        return _init_from(model, source, num_classes)


def _init_from(model: nn.Module, source, num_classes: int | None) -> InitReport:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise InitError(f"num_classes must be a positive number of classes, got {num_classes!r}")
    src = _read(source)
    where = src.path or "the state dict"
    head = classifier_name(model)
    expected = model.state_dict()
    state, fused = src.state, ()
    problem = _mismatch(expected, state, head)
    renamed = _timm_names(model, state) if problem else None
    if renamed is not None:  # RepOpt-VGG's (the reference's) names for timm's RepVGG: the same net, block for block
        state = renamed
        src.notes.append("RepOpt-VGG names renamed to timm's")
        problem = _mismatch(expected, state, head)
    if problem:
        twin = _multi_branch_twin(model, _head_rows(state, head, 1))
        twin_state = twin.state_dict() if twin is not None else {}
        twin_problem = _mismatch(twin_state, state, head) if twin is not None else problem
        if twin is not None and twin_problem is None:
            state, fused = _fuse(twin, state, where)
            problem = _mismatch(expected, state, head)
        elif len(set(twin_state) & set(state)) > len(set(expected) & set(state)):  # closer to the multi-branch form
            problem = f"as multi-branch weights, {twin_problem}"
        elif _is_multi_branch(model) and _plain_form_fits(model, state, head):
            raise FusedWeightsError(f"{where} holds plain (fused) weights, and a fused conv cannot be split back into "
                                    f"the branches of this multi-branch model; fine-tune it as a plain model (method "
                                    f"plain or repopt)")
    if problem:
        arch, ours = (src.config or {}).get("arch"), getattr(model, "arch", None)
        if arch and ours and arch != ours:
            raise InitError(f"{where} holds {arch} weights, which do not fit {ours}: {problem}")
        raise InitError(f"{where} does not fit this model: {problem}")

    change = None
    keys = _head_keys(head)
    if keys and keys[0] in state and tuple(state[keys[0]].shape) != tuple(expected[keys[0]].shape):
        change = HeadChange(head, tuple(state[keys[0]].shape), tuple(expected[keys[0]].shape))
        state = {k: v for k, v in state.items() if k not in keys}  # the model's own fresh classifier stays
    model.load_state_dict(state, strict=False)  # every key checked above: only a replaced head is left out
    if num_classes is not None:
        change = _resize_head(model, head, num_classes, change)
    return InitReport(src.kind, src.path, len(state), change, fused, tuple(src.notes))


def _timm_names(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """`state` on timm's RepVGG names when `model` is a timm RepVGG and every key is a RepOpt-VGG name, else None."""
    from .integrations import timm as timm_models

    if not timm_models.is_timm_arch(getattr(model, "arch", None)) or not model.arch.startswith("timm:repvgg"):
        return None
    renamed = {timm_models.repvgg_name(k): v for k, v in state.items()}
    return None if None in renamed else renamed


def _plain_form_fits(model: nn.Module, state: Mapping[str, Tensor], head: str | None) -> bool:
    from .convert import ConversionError, to_target

    try:
        return _mismatch(to_target(model).state_dict(), state, head) is None
    except ConversionError:
        return False


def _resize_head(model: nn.Module, head: str | None, classes: int, change: HeadChange | None) -> HeadChange | None:
    if head is None:
        raise InitError(f"num_classes={classes}: the model has no nn.Linear classifier to give that many outputs")
    linear = model.get_submodule(head)
    if linear.out_features == classes:
        return change
    fresh = nn.Linear(linear.in_features, classes, bias=linear.bias is not None, device=linear.weight.device,
                      dtype=linear.weight.dtype)
    parent, _, name = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, fresh)
    return HeadChange(head, tuple(change.old) if change else tuple(linear.weight.shape), tuple(fresh.weight.shape))
