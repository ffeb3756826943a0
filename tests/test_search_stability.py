"""The hyper-search records its scales' trajectory per epoch and judges whether they settled (issue 21; the YOLOv6
port's issues 860 and 971); `repopt scales show --trajectory --plot` draws it."""
import json
import math

import pytest
import torch

from repopt.scales import Scales
from repopt.search_trajectory import (SETTLED_BELOW, TRAJECTORY, ScalesTrajectory, read_trajectory, settling,
                                      trajectory_record)


def _scales(a: float, b: float) -> Scales:
    return Scales({"stage0.conv": {"3x3": torch.tensor([a, a]), "1x1": torch.tensor([b, b])}})


def test_a_record_holds_the_relative_change_per_branch_and_overall():
    record = trajectory_record(3, _scales(3.0, 4.0), previous=_scales(3.0, 0.0), initial=_scales(6.0, 8.0))
    branch = record["layers"]["stage0.conv"]
    assert record["epoch"] == 3 and branch["3x3"]["mean"] == 3.0 and branch["1x1"]["std"] == 0.0
    assert branch["3x3"]["moved"] == 0.0 and branch["1x1"]["moved"] == math.inf  # from zero
    assert record["moved"] == pytest.approx(math.sqrt(2 * 16) / math.sqrt(2 * 9))
    assert record["from_initial"] == pytest.approx(0.5) and branch["1x1"]["from_initial"] == pytest.approx(0.5)


def _records(steps: list[float]) -> list[dict]:
    """A trajectory whose all-scales steps are `steps` (epoch 1, 2, ...), one conv and branch moving alike."""
    out = [{"epoch": 0, "moved": None, "from_initial": 0.0, "layers": {"c": {"3x3": {"mean": 1.0, "moved": None}}}}]
    for e, step in enumerate(steps, start=1):
        out.append({"epoch": e, "moved": step, "from_initial": sum(steps[:e]),
                    "layers": {"c": {"3x3": {"mean": 1.0, "moved": step}}}})
    return out


def test_settled_when_the_last_fifth_holds_little_of_the_path():
    report = settling(_records([0.1 / 2 ** e for e in range(20)]))  # decays: the last 4 epochs hold ~0.1 %
    assert report["settled"] is True and report["warning"] is None
    assert report["window_epochs"] == 4 and report["share_last"] < 0.01
    assert report["schedule_share_last"] == pytest.approx(0.2 - math.sin(0.2 * math.pi) / math.pi)


def test_not_settled_when_the_scales_still_move_at_the_end():
    """An oscillation late in the run (issue 860): the path length counts it though the net change is small."""
    report = settling(_records([0.01] * 16 + [0.02, 0.02, 0.02, 0.02]))
    assert report["settled"] is False and report["share_last"] == pytest.approx(0.08 / 0.24)
    assert report["threshold"] == SETTLED_BELOW
    warning = report["warning"]
    assert warning.startswith("the hyper-search's scales have not settled: over the last 4 of 20 epochs they still "
                              "travelled 33% of their whole path (settled: at most 5%")
    assert warning.count(". ") == 0 and "search longer" in warning  # one sentence, with what to do


def test_no_trajectory_is_no_verdict():
    assert settling([]) == {"epochs": 0, "settled": None, "warning": None}


def test_a_search_records_every_epoch_and_judges_itself(tmp_path, capsys, one_thread):
    from repopt.app.cli import main
    from repopt.models import create

    out = tmp_path / "search"
    assert main(["search", "--arch", "repopt_vgg_tiny", "--epochs", "2", "--image-size", "16", "--batch-size", "64",
                 "--train-subset", "128", "--quiet", "--json", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    records = read_trajectory(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    convs = create("repopt_vgg_tiny", mode="hs").target_conv_names()
    assert all(sorted(r["layers"]) == sorted(convs) for r in records)
    assert records[0]["from_initial"] == 0.0 and all(r["moved"] > 0 for r in records[1:])
    assert result["scales_settling"]["epochs"] == 2 and result["scales_settling"]["window_epochs"] == 1
    on_disk = json.loads((out / "result.json").read_text())["scales_settling"]
    assert on_disk == result["scales_settling"]
    if on_disk["warning"]:  # a 2-epoch search: its last epoch is half its rate integral
        assert f"[hs] warning: {on_disk['warning']}" in printed.err


def test_a_resumed_search_keeps_the_epochs_it_had(tmp_path):
    from repopt.models import create

    torch.manual_seed(0)
    model = create("repopt_vgg_tiny", mode="hs", num_classes=10)
    trajectory = ScalesTrajectory(tmp_path, model)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.stage0.conv.scale_3x3.mul_(1.01)  # an "epoch" of training moves one branch
        trajectory.record(epoch, model)
    records = read_trajectory(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[3]["layers"]["stage0.conv"]["3x3"]["moved"] == pytest.approx(0.01, rel=1e-5)  # float32 scales
    assert records[3]["layers"]["stage0.conv"]["1x1"]["moved"] == 0.0
    assert records[3]["layers"]["stage0.conv"]["3x3"]["from_initial"] == pytest.approx(1.01 ** 3 - 1, rel=1e-5)
    resumed = ScalesTrajectory(tmp_path, model, start_epoch=2)  # the checkpoint of epoch 2
    assert [r["epoch"] for r in read_trajectory(tmp_path)] == [0, 1, 2]
    resumed.record(3, model)
    last = read_trajectory(tmp_path)[-1]
    # measured from the model as resumed, and still from the initial values kept beside the trajectory
    assert last["epoch"] == 3 and last["moved"] == 0.0
    assert last["layers"]["stage0.conv"]["3x3"]["from_initial"] == pytest.approx(1.01 ** 3 - 1, rel=1e-5)


def test_scales_show_trajectory_prints_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from repopt.app.cli import main

    run = tmp_path / "search"
    run.mkdir()
    (run / TRAJECTORY).write_text("".join(json.dumps(r) + "\n" for r in _records([0.01] * 16 + [0.02] * 4)))
    png = tmp_path / "trajectory.png"
    assert main(["scales", "show", str(run / "scales.safetensors"), "--trajectory", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not settled" in out and "warning: the hyper-search's scales have not settled" in out
    assert main(["scales", "show", str(run), "--trajectory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settling"]["settled"] is False


def test_scales_show_trajectory_without_one_is_one_sentence(tmp_path, capsys):
    from repopt.app.cli import main

    assert main(["scales", "show", str(tmp_path), "--trajectory"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scales_trajectory.jsonl does not exist" in err


def test_the_pipeline_report_says_whether_the_search_settled():
    from repopt.app.pipeline import report_markdown

    row = dict(method="repopt", top1=90.0, train_seconds=1.0, train_images_per_s=1.0, params=1, deployed_top1=90.0)
    report = {"arch": "a", "dataset": "d", "epochs": 20, "hs_epochs": 20, "batch_size": 64, "optimizer": "sgd",
              "seed": 0, "hs_top1": 10.0, "scales": "s", "results": [row],
              "hs_settling": settling(_records([0.01] * 16 + [0.02] * 4))}
    text = report_markdown(report)
    assert "Hyper-search: scales moved 8.000% over the last 4 of 20 epochs" in text
    assert "Warning: the hyper-search's scales have not settled" in text


def test_a_one_epoch_search_is_not_judged():
    """With one epoch the last fifth is the whole path (always 100 %): no verdict, no warning, a line that says so."""
    from repopt.search_trajectory import describe_settling, settling

    report = settling([{"epoch": 0, "moved": None, "layers": {}},
                       {"epoch": 1, "moved": 0.25, "layers": {"stage0.conv": {"3x3": {"moved": 0.25}}}}])
    assert report["settled"] is None and report["warning"] is None
    assert "too short to tell" in describe_settling(report)
