"""Bad datasets through `repopt train`: exit code 2, one sentence naming the file or folder, and the refusal comes
before training starts (the run directory is never created). The loaders' own errors are tested in test_data.py;
cases: reliability_cases_run.py.
"""
import pytest
from reliability_kit import cases, run_case


@pytest.mark.parametrize("case", cases("data"), ids=lambda c: c.id)
def test_train_refuses_bad_data_before_training(case, tmp_path):
    code, err, line = run_case(case, tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert all(word in line for word in case.expect), line
    assert not (tmp_path / "run").exists()
