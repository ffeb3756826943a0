"""The streamed loader at scale: the memory of an epoch stays flat as the folder grows 10x, and two torchrun ranks
(gloo) on a streamed folder train exactly what one process does with their global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).parent))
from formats import write_jpeg_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARGIN_MIB = 16


def _run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_epoch_memory_stays_flat_over_a_folder_ten_times_larger(tmp_path):
    peaks = {}
    for n in (5, 50):  # images per class: 60 vs 600 images of 160x120 (57 KiB each decoded)
        write_jpeg_folder(tmp_path / str(n), classes=tuple(f"c{i}" for i in range(10)), per_class=n,
                          val_per_class=max(1, n // 5), size=(120, 160))
        r = _run([str(ROOT / "bench" / "loader_memory.py"), str(tmp_path / str(n)), "--workers", "1"])
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[n] = json.loads(r.stdout)
    small, large = peaks[5], peaks[50]
    assert large["images"] == 10 * small["images"]
    # a cache of decoded images would add ~33 MiB here (600 x 57 KiB) to one or the other
    assert large["main_peak_mib"] <= small["main_peak_mib"] + MARGIN_MIB, peaks
    assert large["worker_peak_mib"] <= small["worker_peak_mib"] + MARGIN_MIB, peaks


def test_two_ranks_on_a_streamed_folder_equal_one_process(tmp_path, busy_ports):
    """torchrun, 2 CPU ranks (gloo), per-rank batch 6, raug15 in one worker each == one process with the global batch
    12 in two micro-batches; the evaluation is split over the ranks (9 val images: 5 + 4) and summed."""
    from safetensors.torch import load_file

    write_jpeg_folder(tmp_path / "data", per_class=8, val_per_class=3)
    common = ["train", "--method", "plain", "--arch", "repopt_vgg_tiny", "--dataset", "folder", "--data-dir",
              str(tmp_path / "data"), "--loader", "stream", "--augment", "raug15", "--epochs", "1", "--image-size",
              "16", "--batch-size", "12",
              "--quiet", "--json"]
    ddp = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "repopt", *common,
                "--workers", "1", "--out", str(tmp_path / "ddp")])  # --standalone: a free port
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # decoding in the training process itself: the images do not depend on the number of workers
    single = _run(["-m", "repopt", *common, "--workers", "0", "--accumulate", "2", "--out", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in params)
    # the ranks' evaluation, summed, is the saved model's evaluation on the whole val set in one process
    ddp_loss = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])["test_loss"]
    again = _run(["-m", "repopt", "eval", str(tmp_path / "ddp"), "--json"])
    assert again.returncode == 0, again.stderr[-2000:]
    again = json.loads(again.stdout)
    assert again["loss"] == pytest.approx(ddp_loss, rel=1e-5)
    assert again["top1"] == json.loads((tmp_path / "ddp" / "result.json").read_text())["top1"]
