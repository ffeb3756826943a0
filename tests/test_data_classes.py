"""--classes / load_dataset(classes=...): the two halves of a transfer experiment, chosen in the data layer."""
from __future__ import annotations

import pytest
import torch

from repopt.app.checkpoint import run_data_options
from repopt.app.cli import main
from repopt.data import DataError, load_dataset
from repopt.data.classes import parse_classes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_classes():
    assert parse_classes("0-4") == (0, 1, 2, 3, 4)
    assert parse_classes("5,7, 9") == (5, 7, 9)
    assert parse_classes("0-2,7") == (0, 1, 2, 7)
    with pytest.raises(DataError, match="expected indices such as 0-4"):
        parse_classes("a-b")


def test_both_splits_keep_only_the_classes_relabelled_in_order():
    whole = load_dataset("digits")
    half = load_dataset("digits", classes=[7, 5, 6])
    assert half.num_classes == 3 and half.class_names == (whole.class_names[7], whole.class_names[5],
                                                          whole.class_names[6])
    for split in ("train", "test"):
        images, labels = getattr(whole, f"{split}_images"), getattr(whole, f"{split}_labels")
        mine = (labels == 7) | (labels == 5) | (labels == 6)
        assert torch.equal(getattr(half, f"{split}_images"), images[mine])
        relabelled = torch.tensor([-1, -1, -1, -1, -1, 1, 2, 0, -1, -1])[labels[mine]]
        assert torch.equal(getattr(half, f"{split}_labels"), relabelled)
    assert half.mean == whole.mean and half.std == whole.std  # the two halves of a transfer see pixels alike
    sub = load_dataset("digits", classes=[5, 6, 7], train_subset=30)  # the subset is drawn from those classes
    assert sub.num_train == 30 and torch.bincount(sub.train_labels).tolist() == [10, 10, 10]


@pytest.mark.parametrize("classes, words", [([3, 10], "10 is not one of its 0..9"), ([2, 2], "one is given twice"),
                                            ([], "none given")])
def test_bad_classes_are_one_sentence(classes, words):
    with pytest.raises(DataError, match=words):
        load_dataset("digits", classes=classes)


def test_a_run_records_its_classes_resumes_only_with_them_and_is_evaluated_on_them(tmp_path, capsys):
    args = ["train", "--method", "plain", "--arch", "repopt_vgg_tiny", "--image-size", "16", "--batch-size", "100",
            "--train-subset", "200", "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main([*args, "--classes", "0-4"]) == 0
    from repopt.app.checkpoint import load_trained

    model, config = load_trained(tmp_path)
    assert config["classes"] == [0, 1, 2, 3, 4] and model.linear.out_features == 5
    assert run_data_options(config)["classes"] == [0, 1, 2, 3, 4]
    assert main(["eval", str(tmp_path)]) == 0  # a 5-way model on the 5 classes it was trained on
    capsys.readouterr()
    assert main([*args, "--classes", "5-9"]) == 2  # another half is another run
    assert "classes=[0, 1, 2, 3, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's refusal, with its usage lines
        main([*args[:-2], "--classes", "x"])
    assert e.value.code == 2 and "classes 'x': expected indices such as 0-4" in capsys.readouterr().err
