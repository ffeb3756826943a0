"""The trainer and the training CLI: results on disk, resume, DDP == single process, clear refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repopt.app.cli import main
from repopt.app.train import TrainConfig, TrainingError, train

FAST = dict(arch="repopt_vgg_tiny", dataset="digits", image_size=16, batch_size=128, quiet=True)


@pytest.fixture(scope="module")
def scales_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("hs")
    result = train(TrainConfig(method="hs", epochs=1, out=str(out), grad_clip=5.0, **FAST))
    assert Path(result["scales"]).is_file()
    return result["scales"]


def test_repopt_run_writes_everything(tmp_path, scales_file):
    result = train(TrainConfig(method="repopt", epochs=2, scales=scales_file, out=str(tmp_path), **FAST))
    assert result["top1"] > 20  # 2 short epochs on 10 classes: clearly above chance
    for name in ("checkpoint.pt", "model.safetensors", "metrics.jsonl", "result.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert main(["eval", str(tmp_path), "--json"]) == 0


def test_resume_after_interruption_continues_the_same_run(tmp_path, scales_file, monkeypatch):
    cfg = dict(method="repopt", epochs=3, scales=scales_file, **FAST)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **cfg))

    import repopt.app.train as train_module

    real_save, saves = train_module.save_checkpoint, []

    def crash_after_first(path, payload):
        real_save(path, payload)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["top1"] == straight["top1"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_other_settings_and_other_scales(tmp_path, scales_file):
    cfg = dict(method="repopt", epochs=1, scales=scales_file, out=str(tmp_path), **FAST)
    train(TrainConfig(**cfg))
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(**{**cfg, "lr": 0.5}))
    from repopt import load_scales, save_scales

    other = load_scales(scales_file)
    for entry in other.values():
        entry["3x3"] = entry["3x3"] * 1.5
    save_scales(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="multiplier"):
        train(TrainConfig(**{**cfg, "scales": str(tmp_path / "other.safetensors")}))


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_ddp_two_processes_equal_single_process(tmp_path, scales_file, busy_ports):
    """torchrun, 2 CPU ranks (gloo), per-rank batch 64 == one process with the 128 global batch in two micro-batches
    (BatchNorm sees the same 64 images either way, so the trained weights agree). `--standalone` lets torchrun pick
    a free port: torch's default 29500 and the fixed port this test used before are held busy (busy_ports)."""
    common = ["train", "--method", "repopt", "--arch", "repopt_vgg_tiny", "--scales", scales_file, "--epochs", "1",
              "--image-size", "16", "--batch-size", "128", "--quiet"]
    ddp = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "repopt", *common,
                "--out", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = _run(["-m", "repopt", *common, "--accumulate", "2", "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in params)


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--method", "repopt", "--scales", "x.safetensors", "--grad-clip", "5"], "clipping is refused"),
    (["--batch-size", "5000"], "larger than the 1437 training images"),
    (["--arch", "resnet50"], "unknown model 'resnet50'"),
    (["--method", "repopt", "--scales", "missing.safetensors"], "does not exist"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
])
def test_cli_refuses_bad_input_with_one_sentence(tmp_path, capsys, args, message):
    code = main(["train", "--method", "plain", "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--method", "plain", "--out", str(blocker / "run"), "--quiet"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_pipeline_on_a_cifar_format_directory(tmp_path):
    """The same commands on torchvision's CIFAR-10 layout (real pickle format, random pixels: a smoke run)."""
    from formats import write_cifar

    write_cifar(tmp_path / "data", "cifar10", style=2, per_file=40)
    out = tmp_path / "run"
    code = main(["pipeline", "--arch", "repopt_vgg_tiny", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1",
                 "--hs-epochs", "1", "--batch-size", "32", "--no-int8", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "cifar10" and [r["method"] for r in report["results"]] == ["repopt", "repvgg", "plain"]
    assert (out / "report.md").is_file() and (out / "curves.png").is_file()


@pytest.mark.parametrize("arch", ["repopt_vgg_tiny", pytest.param("repopt_ghostnet_0_5x", marks=pytest.mark.slow)])
def test_train_repopt_without_scales_searches_first(tmp_path, capsys, arch, one_thread):
    """One command gives a RepOpt model: the hyper-search runs into OUT/search and its scales are used. GhostNet: its
    HS scales did not bind to its target model (issue 12), so this command failed after the search."""
    out = tmp_path / "run"
    code = main(["train", "--method", "repopt", "--arch", arch, "--epochs", "1", "--hs-epochs", "1", "--image-size",
                 "16", "--batch-size", "128", "--quiet", "--json", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "search" / "scales.safetensors").is_file() and (out / "model.safetensors").is_file()
    from repopt.app.checkpoint import load_checkpoint

    cfg = load_checkpoint(out / "checkpoint.pt")["config"]
    assert cfg["scales"] == str(out / "search" / "scales.safetensors")
    assert json.loads(capsys.readouterr().out)["method"] == "repopt"


@pytest.mark.parametrize("command", ["train", "pipeline"])
@pytest.mark.parametrize("flags, hs_epochs", [(["--epochs", "3"], 3), (["--epochs", "3", "--hs-epochs", "5"], 5)])
def test_hs_epochs_default_to_epochs_as_the_help_says(command, flags, hs_epochs, tmp_path, monkeypatch, capsys):
    """Issue 12: `repopt pipeline --help` said --hs-epochs defaults to --epochs while the pipeline used 12."""
    import repopt.app.pipeline as pipeline
    import repopt.app.runs as runs

    searched = []

    def fake_train(cfg):  # records the hyper-search's settings instead of training
        searched.extend([cfg.epochs] if cfg.method == "hs" else [])
        raise KeyboardInterrupt  # stop there: the command exits 130

    monkeypatch.setattr(runs, "train", fake_train)
    monkeypatch.setattr(pipeline, "train", fake_train)
    assert main([command, *flags, "--quiet", "--out", str(tmp_path / "run")]) == 130
    assert searched == [hs_epochs]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "hyper-search epochs (default: --epochs)" in " ".join(capsys.readouterr().out.split())


def _first_run(monkeypatch) -> list:
    """Patch the trainer to record the first run's (resolved) config and stop there (the command exits 130)."""
    import repopt.app.pipeline as pipeline
    import repopt.app.runs as runs

    started = []

    def fake_train(cfg):
        started.append(cfg.resolve())
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", fake_train)
    monkeypatch.setattr(pipeline, "train", fake_train)
    return started


def test_the_demo_is_a0_for_6_epochs_at_the_papers_per_256_rate(tmp_path, monkeypatch):
    """`repopt pipeline` with no arguments (the README's demo): repopt_vgg_a0 on the embedded digits, 6 epochs, the
    hyper-search 6 epochs, lr 0.1 per 256 images = 0.025 at batch 64; a --recipe's arch still wins over the demo's."""
    started = _first_run(monkeypatch)
    assert main(["pipeline", "--quiet", "--out", str(tmp_path / "demo")]) == 130
    hs = started.pop()
    assert (hs.method, hs.arch, hs.dataset, hs.epochs, hs.batch_size) == ("hs", "repopt_vgg_a0", "digits", 6, 64)
    assert main(["pipeline", "--scales", "ones", "--quiet", "--out", str(tmp_path / "ones")]) == 130
    repopt = started.pop()  # no search: the first run is the repopt row, with the demo's recipe
    assert (repopt.method, repopt.arch, repopt.epochs) == ("repopt", "repopt_vgg_a0", 6)
    assert (repopt.lr, repopt.weight_decay, repopt.warmup_epochs) == (0.025, 4e-5, 0.25)
    assert repopt.describe().startswith("sgd lr 0.025 (0.1 per 256 images x 64/256, linear scaling), weight decay "
                                        "4e-05")
    assert main(["pipeline", "--recipe", "imagenet-repopt-vgg-b1", "--quiet", "--out", str(tmp_path / "r")]) == 130
    assert started.pop().arch == "repopt_vgg_b1"  # the recipe's, not the demo's (and not reported as overridden)
    assert main(["train", "--quiet", "--out", str(tmp_path / "t")]) == 130
    assert started.pop().arch == "repopt_vgg_a0"  # train: the same net, so the pipeline's scales fit it


def test_search_has_no_hs_epochs_and_zero_is_refused(capsys, monkeypatch, tmp_path):
    import repopt.app.runs as runs

    def no_training(cfg):
        raise AssertionError(f"a {cfg.method} run of {cfg.epochs} epochs started")

    monkeypatch.setattr(runs, "train", no_training)
    with pytest.raises(SystemExit):  # its --epochs are the search's: --hs-epochs was accepted and ignored
        main(["search", "--hs-epochs", "5", "--out", str(tmp_path / "s")])
    assert "unrecognized arguments: --hs-epochs 5" in capsys.readouterr().err
    assert main(["train", "--hs-epochs", "0", "--quiet", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == "repopt train: error: --hs-epochs must be at least 1, got 0\n"


def test_eval_every_skips_the_test_pass_but_not_after_the_last_epoch(tmp_path):
    from repopt.app.metrics import read_metrics

    result = train(TrainConfig(method="plain", epochs=3, eval_every=2, out=str(tmp_path), **FAST))
    tested = [r["test_top1"] is not None for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert tested == [False, True, True] and result["top1"] > 0
    with pytest.raises(TrainingError, match="--eval-every"):
        TrainConfig(method="plain", eval_every=0).validate()
