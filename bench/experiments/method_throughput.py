"""Seconds per training image of plain / RepOpt / RepVGG on the convergence sweep's nets, measured side by side.

    python bench/experiments/method_throughput.py --root runs/convergence      # writes ROOT/throughput.json

The time-to-accuracy table and the figure's wall-time axis (convergence_tables.py) multiply the images each run saw
by these figures, so that the three methods are timed in one process on the same cores, interleaved step by step
(repopt.app.bench's `training_steps`), not across runs that shared the machine with different neighbours. Same
settings as the sweep: one torch thread, its batch size and image size, 10 classes; RepOpt with seed 0's searched
scales where they exist (the step's cost does not depend on their values).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from convergence import Study, hs_dir  # noqa: E402

from repopt._io import write_json  # noqa: E402
from repopt.app.bench.training import training_steps  # noqa: E402
from repopt.app.bench.timing import environment  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/convergence")
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds per net (default 20)")
    ap.add_argument("--nets", nargs="*", default=None, help="default: the study's nets")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    st = Study.load(root)
    out = {"threads": 1, "environment": environment(torch.device("cpu")), "nets": {}}
    for net in args.nets or st.nets:
        scales_file = root / hs_dir(net, 0) / "scales.safetensors"
        scales = None
        if scales_file.is_file():
            from repopt.scales import load_scales
            scales = load_scales(scales_file)
        r = training_steps(net, st.image_size, st.batch_size, args.repeats, num_classes=10,
                           scales=scales)
        out["nets"][net] = {m: r[m]["median_s"] / st.batch_size for m in ("plain", "repopt", "repvgg")}
        out["nets"][net]["details"] = r
        print(net, {m: f"{1 / v:.0f} images/s" for m, v in out["nets"][net].items() if m != "details"}, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "throughput.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
