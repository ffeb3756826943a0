"""bench/device_check.sh --cpu: the GPU check's every step (proofs on the device, optimizer step vs torch's fused
optimizers, training images/s with AMP and channels_last, max batch, AMP overflow on the first step) runs on CPU at toy
sizes and prints one JSON object, so the script is ready when a GPU is lent."""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_cpu_and_prints_one_json():
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--cpu"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["ok"] and result["settings"] == "toy"
    assert result["proofs"]["ok"] and result["proofs"]["cases"]
    assert all(c["path"] == c["expected_path"] for c in result["proofs"]["cases"])
    assert result["amp_first_step_overflow"]["ok"]
    step = result["optimizer_step"][0]
    assert step["sgd_ratio"] > 0 and step["adamw_ratio"] > 0 and step["sgd_path"]
    train = result["training"][0]
    assert train["amp"] and train["channels_last"] and train["repopt"]["images_per_s"] > 0
    assert result["max_batch"][0]["repopt"]["max_batch"] >= 4
