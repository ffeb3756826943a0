"""`repopt.init_from` and `--init-from`: fine-tuning from each kind of source, every file written here in its real
format (a repopt run, a reference RepOpt-VGG .pth, a multi-branch run, a raw state dict); heads of another size,
refusals in one sentence, weights-only loading, and RepOpt keeping the loaded weights (no rule of initialization)."""
from __future__ import annotations

import json
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import repopt
import repopt.app.train as train_module
from repopt.app.checkpoint import load_trained
from repopt.app.cli import main
from repopt.models import create

ARCH = "repopt_vgg_tiny"
FAST = ["--arch", ARCH, "--dataset", "digits", "--image-size", "16", "--batch-size", "128", "--train-subset", "256",
        "--epochs", "1"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    assert main(["train", "--method", "plain", *FAST, "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def repvgg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repvgg")
    assert main(["train", "--method", "repvgg", *FAST, "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture
def step0(monkeypatch):
    """The model's state dict and the optimizer as the run starts its first step (after any initialization)."""
    seen = {}
    real = train_module.build_optimizer

    def spy(cfg, model, fresh):
        optimizer = real(cfg, model, fresh)
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["optimizer"] = optimizer
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    return seen


def target(classes=10, seed=0):
    torch.manual_seed(seed)
    return create(ARCH, mode="target", num_classes=classes)


def trained_like(classes=10, seed=1):
    """A target model's state dict with values no fresh model has (moved BN statistics included)."""
    model = target(classes, seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1 + 0.05)
            else:
                v.fill_(7)
    return model.state_dict()


def assert_same(a: dict, b: dict, skip=()):
    assert set(a) == set(b)
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


def finetune(tmp_path, method, source, *extra):
    return main(["train", "--method", method, *FAST, "--init-from", str(source), "--out", str(tmp_path / "ft"),
                 *extra])


# ---- the four sources, from the command line -----------------------------------------------------------------------
@pytest.mark.parametrize("form", ["directory", "model file", "checkpoint"])
def test_from_a_repopt_run(form, plain_run, tmp_path, step0, capsys):
    source = {"directory": plain_run, "model file": plain_run / "model.safetensors",
              "checkpoint": plain_run / "checkpoint.pt"}[form]
    assert finetune(tmp_path, "plain", source) == 0
    out = capsys.readouterr().out
    file = source / "model.safetensors" if form == "directory" else source
    assert f"[plain] init: loaded 44 tensors from repopt run {file} ({ARCH}, method plain" in out
    assert "classifier" not in out  # same classes: the head is loaded too
    assert_same(step0["state"], load_file(plain_run / "model.safetensors"))


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_from_a_reference_checkpoint_with_wrapper_and_ddp_prefix(wrapper, tmp_path, step0, capsys):
    """The reference code saves {'model': state_dict, ...} (Swin-style); timm / Lightning use 'state_dict'. Its
    RepOpt-VGG target names are repopt's, with DDP's 'module.' in front when saved from a wrapped model."""
    state = trained_like()
    path = tmp_path / "RepOpt-VGG-tiny-ref.pth"
    torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 120, "max_accuracy": 78.6}, path)
    assert finetune(tmp_path, "plain", path) == 0
    out = capsys.readouterr().out
    assert f"loaded 44 tensors from torch file {path} (its {wrapper!r} entry; 'module.' prefix removed)" in out
    assert_same(step0["state"], state)


def test_from_a_reference_training_checkpoint_with_its_yacs_config(tmp_path, monkeypatch, step0, capsys):
    """The reference's utils.save_checkpoint also stores optimizer, lr_scheduler and its yacs config (a dict subclass):
    the config is read as plain data, without yacs (faked here under its module name so that pickle records it)."""
    yacs = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", yacs)
    config = CfgNode(MODEL=CfgNode(ARCH="RepOpt-VGG-tiny"), AMP_OPT_LEVEL="O0")
    config.__dict__["__immutable__"] = True  # as yacs keeps it: pickled as the object's state
    state = trained_like()
    path = tmp_path / "ckpt_epoch_119.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                "max_accuracy": 78.6, "epoch": 119, "config": config}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # the reader has no yacs
    monkeypatch.delitem(sys.modules, "yacs")
    assert finetune(tmp_path, "plain", path) == 0
    assert f"loaded 44 tensors from torch file {path} (its 'model' entry)" in capsys.readouterr().out
    assert_same(step0["state"], state)


def test_from_a_multi_branch_run_fused_computes_what_it_computed(repvgg_run, tmp_path, step0, capsys):
    multi, _ = load_trained(repvgg_run)  # eval mode, multi-branch
    plain = target()
    report = repopt.init_from(plain, repvgg_run)
    assert report.kind == "repopt run" and len(report.fused) == 7 and report.head is None
    x = torch.randn(16, 3, 16, 16)
    torch.testing.assert_close(plain.eval()(x), multi(x), rtol=1e-4, atol=1e-5)
    assert finetune(tmp_path, "plain", repvgg_run) == 0
    assert "7 multi-branch blocks fused into plain convs" in capsys.readouterr().out
    assert_same(step0["state"], plain.state_dict())


def test_repvgg_fine_tunes_multi_branch_weights_unfused(repvgg_run, tmp_path, step0, capsys):
    assert finetune(tmp_path, "repvgg", repvgg_run) == 0
    assert "fused" not in capsys.readouterr().out
    assert_same(step0["state"], load_file(repvgg_run / "model.safetensors"))


def test_repvgg_refuses_plain_weights_in_one_sentence(plain_run, tmp_path, capsys):
    assert finetune(tmp_path, "repvgg", plain_run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds plain (fused) weights" in err and "cannot be split back" in err and str(plain_run) in err


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_from_a_raw_state_dict(fmt, tmp_path, step0, capsys):
    state = trained_like()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert finetune(tmp_path, "plain", path) == 0
    kind = "torch file" if fmt == "pt" else "safetensors file"
    assert f"loaded 44 tensors from {kind} {path}" in capsys.readouterr().out
    assert_same(step0["state"], state)


# ---- heads, refusals, safety ----------------------------------------------------------------------------------------
def test_a_head_of_another_size_is_replaced_in_one_line(tmp_path, step0, capsys):
    state = trained_like(classes=7)
    path = tmp_path / "seven.pth"
    torch.save(state, path)
    assert finetune(tmp_path, "plain", path) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "classifier" in line]
    assert lines == ["[plain] init: classifier linear (7, 128) of the file does not fit 10 classes: replaced by a "
                     "fresh (10, 128)"]
    assert_same(step0["state"], state, skip=("linear.weight", "linear.bias"))
    assert step0["state"]["linear.weight"].shape == (10, 128)
    fresh = target()  # the run's own fresh head (same seed), not the file's
    assert torch.equal(step0["state"]["linear.weight"], fresh.linear.weight.detach())


def test_init_from_with_num_classes_gives_a_fresh_head():
    model = target(classes=10)
    report = repopt.init_from(model, trained_like(classes=10), num_classes=4)
    assert model.linear.out_features == 4 and report.head == repopt.pretrained.HeadChange("linear", (10, 128),
                                                                                          (4, 128))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    for bad in (0, True, 2.5):
        with pytest.raises(repopt.InitError, match="num_classes must be a positive number"):
            repopt.init_from(model, trained_like(), num_classes=bad)


def test_a_bad_key_set_is_one_sentence_and_leaves_the_model_as_it_was(tmp_path, capsys):
    state = trained_like()
    state["stage9.0.conv.weight"] = state.pop("stage1.0.conv.weight")
    del state["stage2.1.bn.running_var"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(repopt.InitError) as e:
        repopt.init_from(model, path)
    assert str(e.value) == (f"{path} does not fit this model: the model's stage1.0.conv.weight, "
                            f"stage2.1.bn.running_var are not in it; it has stage9.0.conv.weight, which the model "
                            f"lacks")
    assert_same(model.state_dict(), before)
    assert finetune(tmp_path, "plain", path) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"repopt train: error: {e.value}"


def test_a_wrong_shape_is_named(tmp_path):
    state = trained_like()
    state["stage3.0.conv.weight"] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(repopt.InitError, match=r"stage3.0.conv.weight is \(64, 32, 1, 1\) in it but \(64, 32, 3, 3\)"):
        repopt.init_from(target(), state)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return open, (str(self.marker), "w")


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": trained_like(), "payload": _Payload(marker)}, path)
    assert finetune(tmp_path, "plain", path) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "weights-only" in err
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"  # a bare pickle, not a torch zip
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=2))  # torch.load's own protocol
    with pytest.raises(repopt.InitError, match="refused to load"):
        repopt.init_from(target(), raw)
    assert not marker.exists()


def test_torch_load_is_only_ever_called_weights_only(plain_run, tmp_path, monkeypatch):
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": trained_like()}, path)
    for source in (path, plain_run / "checkpoint.pt"):
        repopt.init_from(target(), source)
    assert calls and all(w is True for w in calls)


def test_refusals_of_settings_that_would_undo_the_loaded_weights(plain_run, tmp_path, capsys):
    for extra, words in ((["--method", "repopt", "--scales", "ones", "--force-reinit"], "--force-reinit would"),
                         (["--method", "repopt", "--scales", "ones", "--no-mask"], "that is --method plain"),
                         (["--method", "hs"], "hyper-search model")):
        assert main(["train", *extra, *FAST, "--init-from", str(plain_run), "--out", str(tmp_path / "x")]) == 2
        assert words in capsys.readouterr().err


# ---- RepOpt fine-tuning: masks only ---------------------------------------------------------------------------------
def test_repopt_fine_tuning_keeps_the_loaded_weights_and_applies_masks(plain_run, tmp_path, step0, capsys):
    assert finetune(tmp_path, "repopt", plain_run, "--scales", "ones") == 0
    out = capsys.readouterr().out
    assert "[repopt] init: keeps the trained weights (no rule of initialization); the scales ones apply as " \
           "gradient multipliers only" in out
    assert_same(step0["state"], load_file(plain_run / "model.safetensors"))  # no re-init at step 0
    optimizer = step0["optimizer"]
    assert isinstance(optimizer, repopt.RepOptSGD) and sum(m is not None for m in optimizer.branch_sets) == 7


def test_a_run_started_with_init_from_resumes(plain_run, tmp_path, monkeypatch):
    args = ["train", "--method", "plain", *FAST, "--epochs", "2", "--init-from", str(plain_run), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    real_save = train_module.save_checkpoint

    def crash(path, payload):
        real_save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash)
    assert main([*args, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert_same(a, b)
    other = tmp_path / "other.pth"
    torch.save(trained_like(), other)
    args[args.index(str(plain_run))] = str(other)
    assert main([*args, "--out", str(tmp_path / "b")]) == 2  # another --init-from is another run


def test_pipeline_fine_tunes_every_row_and_leaves_repvgg_out_for_plain_weights(plain_run, tmp_path, capsys):
    assert main(["pipeline", *FAST, "--init-from", str(plain_run), "--scales", "ones", "--no-int8",
                 "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("[pipeline] repvgg:")]
    assert len(said) == 1 and "holds plain (fused) weights" in said[0]  # before the first stage
    assert out.index(said[0]) < out.index("[pipeline] train repopt")
    assert "| repopt |" in out and "| plain |" in out and "| repvgg |" not in out
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["init_from"] == str(plain_run) and list(report["skipped_methods"]) == ["repvgg"]


def test_fusing_leaves_the_random_stream_as_it_was(repvgg_run):
    model = target()
    torch.manual_seed(3)
    repopt.init_from(model, repvgg_run)  # builds and fuses a multi-branch twin
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after)
