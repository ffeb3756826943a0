"""The bad scales files and checkpoints tried for issue 7, as data (see reliability_kit.Case); data, command-line
and training cases are in reliability_cases_run.py. The tests run them by theme; reliability_table.py runs them all
again and pastes what the code printed into docs/reliability.md.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from reliability_kit import RunsCode, case, disk_full


def _copy(src: Path, folder: Path, name: str | None = None) -> Path:
    return Path(shutil.copyfile(src, folder / (name or src.name)))


def _edited_scales(ws, folder: Path, name: str, edit) -> Path:
    import repopt

    scales = repopt.load_scales(ws.scales)
    edit(scales)
    return repopt.save_scales(scales, folder / name)


# ---- scales: each bad file through every command that reads it ---------------------------------------------
def _other_arch(ws, d):
    return _copy(ws.small_scales, d)


def _missing_layer(ws, d):
    return _edited_scales(ws, d, "missing.safetensors", lambda s: s.pop("stage2.1.conv"))


def _extra_layer(ws, d):
    def edit(s):
        s["stage9.0.conv"] = {"3x3": torch.ones(4)}
    return _edited_scales(ws, d, "extra.safetensors", edit)


def _wrong_channels(ws, d):
    def edit(s):
        s["stage2.1.conv"] = {**s["stage2.1.conv"], "1x1": torch.ones(7)}
    return _edited_scales(ws, d, "width.safetensors", edit)


def _identity_stride2(ws, d):
    def edit(s):
        s["stage2.0.conv"] = {**s["stage2.0.conv"], "identity": torch.ones(32)}
    return _edited_scales(ws, d, "idstride.safetensors", edit)


def _poisoned(value: float, name: str):
    def build(ws, d):
        def edit(s):
            t = s["stage3.0.conv"]["3x3"].clone()
            t[3] = value
            s["stage3.0.conv"] = {**s["stage3.0.conv"], "3x3": t}
        return _edited_scales(ws, d, name, edit)
    return build


def _truncated(ws, d):
    data = ws.scales.read_bytes()
    (d / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    return d / "trunc.safetensors"


def _written(name: str, data):
    def build(ws, d):
        (d / name).write_bytes(data(d) if callable(data) else data)
        return d / name
    return build


def _model_file_as_scales(ws, d):
    from repopt.app.checkpoint import save_model
    from repopt.models import create

    save_model(d / "model.safetensors", create("repopt_vgg_tiny", num_classes=10), {"arch": "repopt_vgg_tiny"})
    return d / "model.safetensors"


def _evil_pth(ws, d):
    torch.save({"stage0.scale_conv.weight": torch.ones(16), "x": RunsCode(d)}, d / "evil.pth")
    return d / "evil.pth"


def _model_pth(ws, d):
    torch.save({"stage0.conv.weight": torch.ones(16, 3, 3, 3)}, d / "model.pth")
    return d / "model.pth"


# (id, what is wrong, builder, words the error must hold, only wrong for a model: `scales show` may accept it)
BAD_SCALES = [
    ("other_arch", "the scales of repopt_vgg_small for repopt_vgg_tiny", _other_arch,
     ("repopt_vgg_small.safetensors", "does not fit repopt_vgg_tiny", "'stage0.conv'", "32 scales"), True),
    ("missing_layer", "a layer is missing", _missing_layer,
     ("missing.safetensors", "'stage2.1.conv'", "has no scales"), True),
    ("extra_layer", "an extra layer the model lacks", _extra_layer,
     ("extra.safetensors", "'stage9.0.conv'", "does not exist in the model"), True),
    ("wrong_channels", "7 scales for a 32-channel conv", _wrong_channels,
     ("width.safetensors", "'stage2.1.conv'", "'1x1' has 7 scales", "32 output channels"), True),
    ("identity_stride2", "an identity branch on stage2.0.conv (stride 2, 16 -> 32 channels)", _identity_stride2,
     ("idstride.safetensors", "'stage2.0.conv'", "identity branch is impossible"), True),
    ("nan", "a NaN scale", _poisoned(float("nan"), "nan.safetensors"),
     ("nan.safetensors", "'stage3.0.conv'", "'3x3'", "NaN or inf"), False),
    ("inf", "an inf scale", _poisoned(float("inf"), "inf.safetensors"),
     ("inf.safetensors", "'stage3.0.conv'", "'3x3'", "NaN or inf"), False),
    ("truncated", "a truncated safetensors file", _truncated,
     ("trunc.safetensors", "not a readable safetensors"), False),
    ("garbage", "4 KiB of random bytes", _written("garbage.safetensors", np.random.default_rng(0).bytes(4096)),
     ("garbage.safetensors", "not a readable safetensors"), False),
    ("text", "a text file", _written("notes.txt", b"stage0.conv: 3x3 = 1.0, 1x1 = 0.5\n"),
     ("notes.txt", "not a readable safetensors"), False),
    ("empty", "an empty file", _written("empty.safetensors", b""), ("empty.safetensors", "not a readable"), False),
    ("model_file", "a trained model.safetensors instead of scales", _model_file_as_scales,
     ("model.safetensors", "not a repopt scales file"), False),
    ("evil_pth", "a reference .pth holding pickled code (os.system)", _evil_pth,
     ("evil.pth", "refused to load", "posix.system"), False),
    ("evil_pickle", "a raw pickle holding pickled code", _written(
        "evil.pkl", lambda d: pickle.dumps({"a": RunsCode(d)}, protocol=2)), ("evil.pkl", "refused to load"), False),
    ("model_pth", "a .pth state dict of a model, not of scales", _model_pth,
     ("model.pth", "is not a known reference scale key"), False),
]
COMMANDS = {
    "train": ("`train --scales`", lambda ws, d, f: ws.train_args(d / "run", "--scales", str(f))),
    "import": ("`scales import --arch repopt_vgg_tiny`",
               lambda ws, d, f: ["scales", "import", str(f), "-o", str(d / "x.safetensors"), "--arch",
                                 "repopt_vgg_tiny"]),
    "show": ("`scales show`", lambda ws, d, f: ["scales", "show", str(f)]),
}

for _id, _what, _build, _expect, _fit_only in BAD_SCALES:
    for _cmd, (_label, _argv) in COMMANDS.items():
        if _fit_only and _cmd == "show":
            continue  # a well-formed file: without a model there is nothing to refuse

        def _setup(ws, d, _build=_build, _argv=_argv):
            return _argv(ws, d, _build(ws, d))
        _setup.__name__ = f"scales_{_id}_{_cmd}"
        case("scales", f"{_label}: {_what}", *_expect)(_setup)


@case("scales", "`scales show`: a directory", "is a directory")
def scales_directory(ws, d):
    return ["scales", "show", str(d)]


@case("scales", "`scales import -o` below a regular file (cannot be written)", "could not be written")
def scales_unwritable_output(ws, d):
    (d / "file").write_text("a file, not a folder")
    return ["scales", "import", str(_copy(ws.scales, d)), "-o", str(d / "file" / "x.safetensors"),
            "--arch", "repopt_vgg_tiny"]


@case("scales", "`scales import --force` over a file while the disk fills up half-way (injected)", "b.safetensors",
      "could not be written", "No space left on device", "previous file is left as it was",
      fault=lambda: disk_full(safetensors.torch, "save_file"))
def scales_disk_full(ws, d):
    return ["scales", "import", str(ws.scales), "-o", str(_copy(ws.scales, d, "b.safetensors")), "--force",
            "--arch", "repopt_vgg_tiny"]


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _spoil_checkpoint(ws, d, spoil) -> Path:
    """A copy of the workspace run whose checkpoint.pt is spoilt: spoil(path), or these bytes."""
    run = ws.copy_run(d / "run")
    spoil(run / "checkpoint.pt") if callable(spoil) else (run / "checkpoint.pt").write_bytes(spoil)
    return run


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@case("checkpoints", "resume from a truncated checkpoint.pt", "checkpoint.pt", "truncated or corrupt")
def ckpt_truncated_resume(ws, d):
    return ws.train_args(_spoil_checkpoint(ws, d, _half))


@case("checkpoints", "`eval` of a run whose checkpoint.pt is truncated", "checkpoint.pt", "truncated or corrupt")
def ckpt_truncated_eval(ws, d):
    return ["eval", str(_spoil_checkpoint(ws, d, _half))]


@case("checkpoints", "resume from an empty checkpoint.pt", "checkpoint.pt", "the file ends early")
def ckpt_empty_resume(ws, d):
    return ws.train_args(_spoil_checkpoint(ws, d, b""))


@case("checkpoints", "resume from a checkpoint.pt holding pickled code", "checkpoint.pt", "refused to load",
      "posix.system")
def ckpt_evil_resume(ws, d):
    return ws.train_args(_spoil_checkpoint(ws, d, lambda p: torch.save({"config": RunsCode(d)}, p)))


@case("checkpoints", "`eval` of a checkpoint.pt holding pickled code", "checkpoint.pt", "refused to load")
def ckpt_evil_eval(ws, d):
    return ["eval", str(_spoil_checkpoint(ws, d, lambda p: torch.save({"config": RunsCode(d)}, p)))]


@case("checkpoints", "resume from a checkpoint.pt that is some other torch file", "checkpoint.pt",
      "not a repopt training checkpoint", "another --out")
def ckpt_foreign_resume(ws, d):
    return ws.train_args(_spoil_checkpoint(ws, d, lambda p: torch.save({"state_dict": {}}, p)))


@case("checkpoints", "`eval` of a checkpoint.pt holding one tensor", "checkpoint.pt",
      "not a repopt training checkpoint")
def ckpt_tensor_eval(ws, d):
    return ["eval", str(_spoil_checkpoint(ws, d, lambda p: torch.save(torch.ones(3), p)))]


@case("checkpoints", "a RepOpt run's --out reused by `train --method plain`", "checkpoint.pt", "method='repopt'",
      "method='plain'")
def ckpt_other_method(ws, d):
    return ws.train_args(ws.copy_run(d / "run"), "--method", "plain")


@case("checkpoints", "a repopt_vgg_tiny run's --out reused for repopt_vgg_small", "checkpoint.pt",
      "arch='repopt_vgg_tiny'", "arch='repopt_vgg_small'")
def ckpt_other_arch(ws, d):
    return ws.train_args(ws.copy_run(d / "run"), "--arch", "repopt_vgg_small", "--scales", str(ws.small_scales))


@case("checkpoints", "resume with other scales than the run started with (CLI; library: tests/test_train.py)",
      "checkpoint.pt", "stage0.conv", "multiplier", "differs")
def ckpt_other_scales(ws, d):
    import repopt

    scales = repopt.load_scales(ws.scales)
    scales["stage0.conv"] = {k: v * 1.5 for k, v in scales["stage0.conv"].items()}
    other = repopt.save_scales(scales, d / "other.safetensors")
    return ws.train_args(ws.copy_run(d / "run"), "--scales", str(other))


def _model_file(d: Path, **config) -> Path:
    from repopt.app.checkpoint import save_model
    from repopt.models import create

    d.mkdir(parents=True, exist_ok=True)
    cfg = {"arch": "repopt_vgg_tiny", "method": "plain", "num_classes": 10, "dataset": "digits", "image_size": 16,
           **config}
    save_model(d / "model.safetensors", create("repopt_vgg_tiny", num_classes=10), cfg)
    return d / "model.safetensors"


@case("checkpoints", "`eval` of a truncated model.safetensors", "model.safetensors", "not a readable model file")
def model_truncated_eval(ws, d):
    _half(_model_file(d / "done"))
    return ["eval", str(d / "done")]


@case("checkpoints", "`eval` of a model.safetensors whose config names an unknown model", "model.safetensors",
      "does not describe a model", "resnet_9000")
def model_unknown_arch_eval(ws, d):
    return ["eval", str(_model_file(d / "done", arch="resnet_9000"))]


@case("checkpoints", "`eval` of a model.safetensors whose weights belong to another model", "model.safetensors",
      "weights do not fit repopt_vgg_small")
def model_other_arch_eval(ws, d):
    return ["eval", str(_model_file(d / "done", arch="repopt_vgg_small"))]
