"""The training loop: one function, `train(config)`, for every method (repopt, repvgg, plain, hs).

Data lives on the device and is augmented in batches; the LR follows a per-iteration warmup + cosine schedule; a
checkpoint is written atomically after every epoch and re-running the same command resumes from it. Under `torchrun`
each rank trains its slice of the same global batch (DDP; gloo on CPU, nccl on CUDA) and rank 0 writes.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import check_writable, write_json
from ..search_trajectory import ScalesTrajectory, describe_settling, read_trajectory, settling
from . import distributed as dist
from .checkpoint import CHECKPOINT, MODEL, RESULT, SCALES, CheckpointError, load_run_checkpoint, mode_of, \
    save_checkpoint, save_model
from .kernels import build_before_clock
from .metrics import MetricsLog
from .recipes import DEFAULTS, LR_BASE_SIZE, default_warmup_epochs, describe_lr, describe_preset, scaled_lr

METHODS = ("repopt", "repvgg", "plain", "hs")
OPTIMIZERS = tuple(DEFAULTS)
# what must match between a checkpoint and the command that resumes it
RESUME_KEYS = ("method", "arch", "dataset", "train_subset", "image_size", "optimizer", "epochs", "batch_size", "lr",
               "weight_decay", "seed", "accumulate", "label_smoothing", "warmup_epochs", "momentum", "nesterov",
               "model_options", "reinit", "mask", "init_from", "classes")
# what a checkpoint written before these keys existed had
RESUME_DEFAULTS = {"reinit": True, "mask": True, "init_from": None, "classes": None}


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, a diverged loss)."""


@dataclass
class TrainConfig:
    method: str = "repopt"
    arch: str = "repopt_vgg_a0"    # the demo's 22-layer net, the default of every command (README)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    train_subset: int | None = None  # train on a fixed, class-balanced part of the training split (data/subset.py)
    classes: list[int] | None = None  # only these classes of the dataset, relabelled 0..k-1 (data/classes.py)
    optimizer: str = "sgd"
    epochs: int = 30
    batch_size: int = 64            # global batch per optimizer step, over all ranks
    lr: float | None = None         # absolute peak learning rate; None: lr_base scaled to batch_size
    lr_base: float | None = None    # peak learning rate per lr_base_size images (default: recipes.DEFAULTS)
    lr_base_size: int = LR_BASE_SIZE
    weight_decay: float | None = None  # default: recipes.DEFAULTS
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float | None = None  # default: warmup_fraction of the run
    warmup_fraction: float | None = None  # default: the paper's 5/120 (recipes.WARMUP_FRACTION); a preset may differ
    label_smoothing: float = 0.1
    accumulate: int = 1             # micro-batches per optimizer step
    grad_clip: float | None = None  # global-norm clipping; refused with repopt (it breaks the equivalence)
    scales: str | None = None       # scales file for method repopt
    identity_init: str = "searched"
    force_reinit: bool = False      # apply the rule of initialization even to BatchNorms that look trained
    reinit: bool = True             # repopt: apply the rule of initialization (False: the --no-reinit ablation)
    mask: bool = True               # repopt: gradient multipliers (False: the --no-mask ablation; app/ablations.py)
    init_from: str | None = None    # start from these trained weights (repopt.init_from); repopt: masks only
    amp: bool = False               # bf16 autocast on CPU, fp16 + GradScaler on CUDA
    channels_last: bool = False
    ema: float | None = None        # EMA decay of the weights used for evaluation, e.g. 0.999
    eval_every: int = 1             # test every N epochs (and after the last); larger saves time on big test sets
    seed: int = 0
    device: str = "auto"
    out: str = "runs/train"
    quiet: bool = False
    model_options: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)  # repopt.data.load_dataset options (loader, augment, workers...)
    recipe: str | None = None       # the --recipe preset this run started from (recipes.PRESETS)
    recipe_overrides: list = field(default_factory=list)  # its settings that explicit flags replaced
    num_classes: int | None = None  # filled in from the dataset

    def resolve(self) -> "TrainConfig":
        """Fill in the recipe's defaults (recipes.py) for what was left None: peak lr from the per-256 base and the
        global batch, weight decay, warmup. Idempotent; `train` calls it, and the resolved values are what a run
        records and what a resumed run must match."""
        defaults = DEFAULTS.get(self.optimizer)
        if defaults is None:
            return self  # validate() names the unknown optimizer
        if self.lr is None:
            if self.lr_base is None:
                self.lr_base = defaults.lr_base
            self.lr = scaled_lr(self.lr_base, self.batch_size, defaults.scaling, self.lr_base_size)
        if self.weight_decay is None:
            self.weight_decay = defaults.weight_decay
        if self.warmup_epochs is None:
            self.warmup_epochs = default_warmup_epochs(self.epochs, self.warmup_fraction)
        return self

    def describe(self) -> str:
        """The recipe of this (resolved) run in one line, printed at its start."""
        lr = describe_lr(self.lr, self.lr_base, self.batch_size, DEFAULTS[self.optimizer].scaling,
                         self.lr_base_size)
        extra = f", momentum {self.momentum}{' nesterov' if self.nesterov else ''}" if self.optimizer == "sgd" else ""
        data = "".join(f", {k} {v}" for k, v in self.data_options.items())
        if self.classes is not None:
            data += f", classes {','.join(map(str, self.classes))}"
        if self.train_subset is not None:
            data += f", training subset {self.train_subset}"
        ablation = [a for a, on in (("no rule of initialization", not self.reinit),
                                    ("no gradient multipliers", not self.mask),
                                    ("all scales 1", self.method == "repopt" and self.scales == "ones")) if on]
        return (f"{self.optimizer} lr {lr}, weight decay {self.weight_decay:g}{extra}, warmup "
                f"{self.warmup_epochs:g} epochs then cosine to 0, label smoothing {self.label_smoothing:g}, "
                f"batch {self.batch_size}, {self.epochs} epochs{data}" + (f" (ablation: {', '.join(ablation)})"
                                                                          if ablation else ""))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 1:
            raise TrainingError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1 or self.accumulate < 1:
            raise TrainingError(f"--batch-size and --accumulate must be positive, got {self.batch_size} and "
                                f"{self.accumulate}")
        if self.lr_base is not None and not (math.isfinite(self.lr_base) and self.lr_base > 0):
            raise TrainingError(f"--lr-base must be a finite number > 0, got {self.lr_base}")
        if self.lr_base_size < 1:
            raise TrainingError(f"--lr-base-size must be at least 1, got {self.lr_base_size}")
        self.resolve()
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise TrainingError(f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        # torch's own refusals of these come as bare ValueErrors after the run directory exists
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainingError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainingError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainingError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.eval_every < 1:
            raise TrainingError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise TrainingError(f"--ema is a decay in (0, 1), e.g. 0.999; got {self.ema}")
        from ..models.registry import check_name

        try:
            check_name(self.arch)  # a registered name, or timm:NAME where timm is installed
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if self.method == "repopt" and self.grad_clip:
            raise TrainingError("gradient clipping is refused with RepOpt: clipping by the global norm is not an "
                                "elementwise constant map, so the target conv would no longer train as its "
                                "multi-branch block (train without --grad-clip)")
        from .ablations import check_ablations

        refused = check_ablations(self)
        if refused:
            raise TrainingError(refused)
        if self.init_from:
            self._check_init_from()
        if self.method == "repopt" and not self.scales:
            raise TrainingError("method repopt needs a scales file (or use `repopt train`, which searches them "
                                "first when --scales is not given)")

    def _check_init_from(self) -> None:
        """--init-from keeps the loaded weights: what would overwrite them, or leave nothing of RepOpt, is refused."""
        if self.method == "hs":
            raise TrainingError("--init-from does not apply to the hyper-search model: its branch scales start at the "
                                "search's own values, so it trains from scratch")
        if self.force_reinit:
            raise TrainingError("--force-reinit would overwrite the weights that --init-from loads; leave one out")
        if self.method == "repopt" and not self.mask:
            raise TrainingError("--init-from with --no-mask leaves nothing of RepOpt (the trained weights are never "
                                "re-initialized): that is --method plain --init-from")

    @property
    def applies_rule_of_initialization(self) -> bool:
        """A fresh repopt run re-initializes its target convs, unless --no-reinit, or --init-from (trained weights)."""
        return self.method == "repopt" and self.reinit and not self.init_from


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for but CUDA is not available here")
    return dev


def build_model(cfg: TrainConfig) -> nn.Module:
    from ..models import create

    try:
        return create(cfg.arch, mode=mode_of(cfg.method), num_classes=cfg.num_classes, **cfg.model_options)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def build_optimizer(cfg: TrainConfig, model: nn.Module, fresh: bool):
    from ..optim import RepOptAdamW, RepOptLion, RepOptSGD, param_groups
    from ..scales import ScalesError
    from ..search import hs_param_groups

    kwargs = {"sgd": dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0),
              "adamw": dict(lr=cfg.lr), "lion": dict(lr=cfg.lr)}[cfg.optimizer]
    if cfg.optimizer in ("sgd", "adamw"):
        kwargs["fused"] = True  # torch's fastest path on CPU and CUDA
    if cfg.method == "repopt":
        from .ablations import scales_for, unmasked_repopt

        cls = {"sgd": RepOptSGD, "adamw": RepOptAdamW, "lion": RepOptLion}[cfg.optimizer]
        scales = scales_for(cfg, model)
        try:
            if cfg.mask:
                return cls.from_scales(model, scales, reinit=fresh and cfg.applies_rule_of_initialization,
                                       identity_init=cfg.identity_init, force_reinit=cfg.force_reinit,
                                       weight_decay=cfg.weight_decay, **kwargs)
            unmasked_repopt(cfg, model, scales, fresh)  # then the plain optimizer below
        except ScalesError as e:  # name the file as well as the layer
            raise ScalesError(f"{cfg.scales} does not fit {cfg.arch}: {e}") from None
    groups = hs_param_groups(model, cfg.weight_decay) if cfg.method == "hs" else \
        param_groups(model, cfg.weight_decay)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "lion": RepOptLion}[cfg.optimizer]
    return cls(groups, **kwargs)


def _init_from(cfg: TrainConfig, model: nn.Module, say: bool) -> None:
    """Load --init-from into the freshly built model (its classifier already has the dataset's classes)."""
    from ..pretrained import init_from

    report = init_from(model, cfg.init_from)
    if say:
        print(f"[{cfg.method}] init: {report.describe()}", flush=True)
        if report.head is not None:
            print(f"[{cfg.method}] init: {report.describe_head()}", flush=True)
        if cfg.method == "repopt":
            print(f"[{cfg.method}] init: keeps the trained weights (no rule of initialization); the scales "
                  f"{cfg.scales} apply as gradient multipliers only", flush=True)


def rows_for_init_from(base: TrainConfig, methods) -> tuple[tuple[str, ...], dict[str, str]]:
    """The methods whose model can start from base.init_from, and {left out: why}, checked before a pipeline's first
    stage: weights that fit no model are refused (InitError, one sentence); plain weights leave the repvgg row out (a
    fused conv has no branches to start them from)."""
    import dataclasses

    from ..pretrained import FusedWeightsError, init_from

    kept, skipped = [], {}
    for method in methods:
        model = build_model(dataclasses.replace(base, method=method, num_classes=base.num_classes or 2))
        try:
            init_from(model, base.init_from)
        except FusedWeightsError as e:
            skipped[method] = f"{method}: {e}"
            continue
        kept.append(method)
    return tuple(kept), skipped


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, batches, device=None) -> tuple[float, float]:
    """(top-1 accuracy in %, mean cross-entropy) over `batches` of (x, y); under torchrun the counts are summed over
    the ranks, each of which evaluated its share of the test set (every rank must call it)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        logits = model(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    correct, total, loss = dist.all_sum([correct, total, loss], device or next(model.parameters()).device)
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out / CHECKPOINT)
    except OSError as e:
        raise TrainingError(f"output directory {str(out)!r} is not writable ({e.strerror})") from None


def uses_grad_scaler(cfg: TrainConfig, device: torch.device) -> bool:
    """fp16 autocast (CUDA) needs loss scaling; bf16 (CPU) has fp32's range and does not."""
    return cfg.amp and device.type == "cuda"


def _kept(ckpt_path: Path, epochs_done: int) -> str:
    if epochs_done and ckpt_path.is_file():
        return f"the last good checkpoint {ckpt_path} (epoch {epochs_done}) is kept"
    return "no checkpoint had been written yet"


def _first_non_finite(model: nn.Module) -> str | None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def check_same_settings(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse a run directory's file (checkpoint, result) written with other settings than `cfg` (RESUME_KEYS)."""
    for key in RESUME_KEYS:
        if saved.get(key, RESUME_DEFAULTS.get(key)) != getattr(cfg, key):
            raise CheckpointError(f"{path} was written by a run with {key}={saved.get(key)!r}, but this command has "
                                  f"{key}={getattr(cfg, key)!r}; use another --out or the same settings to resume")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) one run into cfg.out; returns the result dict also written to OUT/result.json."""
    from tqdm import tqdm

    from ..data import load_dataset

    cfg.validate()  # also resolves the recipe's defaults (lr from the per-256 base, wd, warmup)
    rank, world, device = dist.setup(resolve_device(cfg.device))
    try:
        ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, train_subset=cfg.train_subset,
                          classes=cfg.classes, **cfg.data_options)
        cfg.num_classes, cfg.image_size = ds.num_classes, ds.image_size
        if cfg.batch_size % (world * cfg.accumulate):
            raise TrainingError(f"--batch-size {cfg.batch_size} must be divisible by world size x --accumulate = "
                                f"{world * cfg.accumulate}")
        if cfg.batch_size > ds.num_train:
            raise TrainingError(f"--batch-size {cfg.batch_size} is larger than the {ds.num_train} training images "
                                f"of {cfg.dataset}")
        out = Path(cfg.out)
        if rank == 0:
            _prepare_out(out)
        ckpt_path = out / CHECKPOINT
        resume = load_run_checkpoint(ckpt_path) if ckpt_path.is_file() else None
        if resume is not None:
            check_same_settings(resume["config"], cfg, ckpt_path)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
        if cfg.init_from and resume is None:  # a resumed run's checkpoint holds the weights it has trained since
            _init_from(cfg, model, say=rank == 0 and not cfg.quiet)
        optimizer = build_optimizer(cfg, model, fresh=resume is None)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        per_rank = cfg.batch_size // world
        steps_per_epoch = ds.steps_per_epoch(per_rank, world)
        total_steps = cfg.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
        ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        use_scaler = uses_grad_scaler(cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

        start_epoch, train_seconds, skipped = 0, 0.0, 0
        if resume is not None:
            try:
                model.load_state_dict(resume["model"])
                optimizer.load_state_dict(resume["optimizer"])  # refuses other multipliers than the run started with
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"{ckpt_path} cannot resume this run: {e}") from None
            scheduler.load_state_dict(resume["scheduler"])
            if ema is not None and "ema" in resume:
                ema.load_state_dict(resume["ema"])
            if resume.get("scaler"):  # empty when the run started without a GradScaler (e.g. without --amp)
                scaler.load_state_dict(resume["scaler"])
            torch.set_rng_state(resume["rng"])
            start_epoch, train_seconds, skipped = resume["epoch"], resume["train_seconds"], resume["skipped_steps"]
        net = dist.wrap(model, device)
        kernels = build_before_clock(optimizer)  # a first build must not count as RepOpt's training time
        log = MetricsLog(out / "metrics.jsonl", enabled=rank == 0, keep_epochs=start_epoch)
        trajectory = ScalesTrajectory(out, model, start_epoch, enabled=rank == 0) if cfg.method == "hs" else None

        show = rank == 0 and not cfg.quiet and dist.is_tty()
        if rank == 0 and not cfg.quiet:
            if cfg.recipe:
                print(describe_preset(cfg.recipe, asdict(cfg), cfg.recipe_overrides), flush=True)
            print(f"[{cfg.method}] {cfg.describe()}", flush=True)
            if hasattr(ds, "describe"):
                print(f"[{cfg.method}] data: {ds.describe()}", flush=True)
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            batches = ds.train_batches(per_rank, epoch, seed=cfg.seed, device=device, rank=rank, world_size=world)
            bar = tqdm(batches, total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not show, leave=False)
            for step, (x, y) in enumerate(bar):
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                for k, (xm, ym) in enumerate(zip(x.chunk(cfg.accumulate), y.chunk(cfg.accumulate))):
                    with dist.no_sync(net, k < cfg.accumulate - 1), \
                            torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                        logits = net(xm)
                        loss = F.cross_entropy(logits.float(), ym, label_smoothing=cfg.label_smoothing)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"the loss became {float(loss.detach())} at step "
                                            f"{epoch * steps_per_epoch + step} (epoch {epoch + 1}); stopped, "
                                            f"{_kept(ckpt_path, epoch)} (lower --lr?)")
                    scaler.scale(loss / cfg.accumulate).backward()
                    loss_sum += float(loss.detach()) * xm.shape[0]
                    labels = ym if ym.dim() == 1 else ym.argmax(1)  # mixup / cutmix: the larger share
                    correct += int((logits.argmax(1) == labels).sum())
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scale_before = scaler.get_scale() if use_scaler else None
                scaler.step(optimizer)
                scaler.update()
                if use_scaler and scaler.get_scale() < scale_before:  # inf/NaN grads: step skipped, scale backed off
                    skipped += 1
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                seen += x.shape[0]
                if show:
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                                    img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            bad = _first_non_finite(model)  # a finite last loss does not mean the last update was finite
            if bad is not None:
                raise TrainingError(f"{bad} became NaN or inf during epoch {epoch + 1} (by step "
                                    f"{(epoch + 1) * steps_per_epoch - 1}); stopped, {_kept(ckpt_path, epoch)} "
                                    f"(lower --lr?)")
            eval_model = ema.module if ema is not None else model
            top1 = test_loss = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                dist.sync_buffers(eval_model)
                top1, test_loss = evaluate(eval_model, ds.test_batches(256, device=device, rank=rank,
                                                                       world_size=world), device)
            log.write({"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                       "train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1),
                       "test_loss": test_loss, "test_top1": top1, "epoch_seconds": epoch_seconds,
                       "images_per_s": seen * world / epoch_seconds, "skipped_steps": skipped})
            if trajectory is not None:  # the search judges its own convergence (repopt/search_trajectory.py)
                trajectory.record(epoch + 1, model)
            if rank == 0:
                payload = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                           "rng": torch.get_rng_state(), "epoch": epoch + 1, "train_seconds": train_seconds,
                           "skipped_steps": skipped}
                if ema is not None:
                    payload["ema"] = ema.state_dict()
                save_checkpoint(ckpt_path, payload)
            dist.barrier()
            if not show and rank == 0 and not cfg.quiet:
                note = f" ({skipped} steps skipped by the AMP GradScaler so far)" if skipped else ""
                tested = "" if top1 is None else f" test top1 {top1:.2f}%"
                print(f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / max(seen, 1):.4f}"
                      f"{tested}{note}", flush=True)

        final = ema.module if ema is not None else model
        # the last epoch tested `final` already (unless the run was finished before this call): no second pass
        last_top1 = top1 if start_epoch < cfg.epochs else None
        result = _finish(cfg, final, ds, device, out, train_seconds, skipped, steps_per_epoch, rank, last_top1,
                         kernels)
        dist.barrier()
        return result
    finally:
        dist.teardown()


def _finish(cfg, model, ds, device, out: Path, train_seconds, skipped, steps_per_epoch, rank,
            top1: float | None = None, kernels: dict | None = None) -> dict[str, Any]:
    from ..models import reparameterize_model
    from ..quant.fold import fold_batchnorm

    if top1 is None:
        top1, _ = evaluate(model, ds.test_batches(256, device=device, rank=rank, world_size=dist.world_size()),
                           device)
    # the network that ships: RepVGG blocks fused into one conv each, BN folded into the convs
    deployed = fold_batchnorm(reparameterize_model(model.eval()) if cfg.method == "repvgg" else model.eval())
    deployed_top1 = evaluate(deployed, ds.test_batches(256, device=device, rank=rank,
                                                       world_size=dist.world_size()), device)[0]
    images = cfg.epochs * steps_per_epoch * cfg.batch_size
    result = {"method": cfg.method, "arch": cfg.arch, "dataset": cfg.dataset, "image_size": cfg.image_size,
              "train_subset": cfg.train_subset, "optimizer": cfg.optimizer,
              "epochs": cfg.epochs, "top1": top1, "deployed_top1": deployed_top1,
              "train_seconds": train_seconds, "train_images_per_s": images / max(train_seconds, 1e-9),
              "params": sum(p.numel() for p in deployed.parameters()), "skipped_steps": skipped,
              "out": str(out), "config": asdict(cfg), **(kernels or {})}
    if rank == 0:
        save_model(out / MODEL, model, asdict(cfg))
        if cfg.method == "hs":
            from ..scales import save_scales
            from ..search import extract_scales

            scales = extract_scales(model)
            scales.metadata.update({"arch": cfg.arch, "dataset": cfg.dataset, "hs_epochs": str(cfg.epochs)})
            save_scales(scales, out / SCALES)
            result["scales"] = str(out / SCALES)
            result["scales_settling"] = settling(read_trajectory(out))
            if not cfg.quiet:
                print(f"[hs] {describe_settling(result['scales_settling'])}", flush=True)
            if result["scales_settling"]["warning"]:
                print(f"[hs] warning: {result['scales_settling']['warning']}", file=sys.stderr, flush=True)
        write_json(out / RESULT, result)  # the run's "finished" marker: never half-written
        from .metrics import plot_curves

        plot_curves({cfg.method: out / "metrics.jsonl"}, out / "curves.png", quiet=True)
    return result
