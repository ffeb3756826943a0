"""Bad checkpoints and model files, through `repopt train` (resume) and `repopt eval`: exit code 2, one sentence
naming the file, the spoilt file left as it was. Cases: reliability_cases.py.

Resuming with other scales than the run started with is refused by the optimizer (tests/test_train.py::
test_resume_refuses_other_settings_and_other_scales, tests/test_optim.py::test_resuming_with_other_scales_is_refused);
the case here proves the command line turns that refusal into exit code 2 and one sentence.
"""
import pytest
import torch
from reliability_kit import cases, run_case

from repopt.app.checkpoint import CheckpointError, load_trained


@pytest.mark.parametrize("case", cases("checkpoints"), ids=lambda c: c.id)
def test_cli_refuses_bad_checkpoints(case, tmp_path):
    code, err, line = run_case(case, tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert all(word in line for word in case.expect), line


def test_load_trained_refuses_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": {"arch": "repopt_vgg_tiny"}, "model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: not a readable checkpoint, truncated or corrupt"):
        load_trained(tmp_path)
