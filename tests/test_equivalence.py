"""Proofs-as-tests of MATH.md (1)-(5): the explicit CSLA block trained by the stock optimizer and the target conv
trained by RepOpt stay equal, to float64 rounding, after every one of 200 steps."""
import pytest
import torch

from repopt import BranchSet
from repopt.proofs import (BRANCH_SETS, OPTIMIZERS, TOLERANCE, build_pair, expected_path, rel_err, run_proof,
                           unavailable)


@pytest.mark.parametrize("branch_set", list(BRANCH_SETS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_repopt_equals_csla_training(optimizer, branch_set):
    why = unavailable(optimizer)
    if why is not None:
        pytest.skip(why)
    steps = 200
    if expected_path(optimizer) == "triton" and not torch.cuda.is_available():  # Triton's interpreter is slow
        if branch_set not in ("3x3+1x1+identity", "depthwise 3x3+identity"):
            pytest.skip("the Triton cases run two branch sets under the interpreter (all five on a GPU)")
        steps = 10
    result = run_proof(optimizer, branch_set, steps=steps)
    assert len(result.errors) == steps
    assert result.max_rel_err <= TOLERANCE, result
    assert result.paths == [result.expected_path], "the case did not prove the path it names"


def test_a_compiled_case_that_fell_back_to_eager_is_not_a_proof_of_the_compiled_path(monkeypatch, capsys):
    """Where torch.compile cannot build the update (no C++ compiler, say), RepOptSGD(compiled=True) warns and takes
    its other paths (blocks for that step, then its default): exact still, but the compiled path is then not what was
    proven, and the case, `repopt verify`'s table and its JSON say so and fail."""
    import json

    from repopt.app.cli import main
    from repopt.optim import sgd

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(sgd, "step_compiled", cannot_compile)
    with pytest.warns(UserWarning, match="could not compile"):
        result = run_proof("sgd compiled nesterov", "3x3+1x1+identity", steps=3)
    assert result.max_rel_err <= TOLERANCE and "compiled" not in result.paths and not result.ok
    argv = ["verify", "--optimizer", "sgd compiled nesterov", "--branches", "3x3+1x1+identity", "--steps", "3"]
    with pytest.warns(UserWarning):
        assert main(argv + ["--json"]) == 1
    case = json.loads(capsys.readouterr().out)["cases"][0]
    took = "+".join(result.paths)
    assert (case["path"], case["expected_path"], case["ok"]) == (took, "compiled", False)
    with pytest.warns(UserWarning):
        assert main(argv) == 1
    assert f"FAIL: took {took}, not compiled" in capsys.readouterr().out


def test_verify_names_the_path_of_each_case(capsys):
    import json

    from repopt.app.cli import main
    from repopt.proofs import expected_path

    cases = ["sgd nesterov wd", "sgd whole tensors", "lion eager"]
    argv = ["verify", "--branches", "3x3+1x1 stride 2", "--steps", "2", "--json"]
    assert main(argv + [a for c in cases for a in ("--optimizer", c)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and [c["path"] for c in out["cases"]] == [expected_path(c) for c in cases]
    assert expected_path("sgd whole tensors") == "whole" and expected_path("lion eager") == "eager"


@pytest.mark.parametrize("optimizer", ["sgd nesterov wd", "sgd fused one-row blocks", "sgd whole tensors",
                                       "sgd triton"])
def test_proof_detects_a_wrong_multiplier(monkeypatch, optimizer):
    if unavailable(optimizer) is not None:
        pytest.skip(unavailable(optimizer))
    """The harness can fail: a multiplier of 1 on every tap (as if the conv had one branch of scale 1) drifts away
    from the CSLA block, on the default (native) path and on the eager paths."""
    def ones(self, power, device=None, dtype=torch.float64):  # every path reads the tap table
        return torch.ones(self.geometry.out_channels, 1, *self.geometry.kernel_size, device=device, dtype=dtype)

    monkeypatch.setattr(BranchSet, "tap_table", ones)
    result = run_proof(optimizer, "3x3+1x1+identity", steps=20)
    assert result.max_rel_err > 1e-4


def test_reference_code_adamw_rule_is_not_exact(monkeypatch):
    """The reference code scales grad and moment by the raw (power-1) scale sum; with negative scales that is not
    the CSLA block's training (MATH (4) explains why). Our rule passes the same case above."""
    def reference_rule(self, denom_sqrt, eps):
        total = sum(torch.zeros_like(denom_sqrt[:, :1, :1, :1]) + a.view(-1, 1, 1, 1).to(denom_sqrt)
                    for a in self.conv_scales.values())
        return total.abs() / (denom_sqrt + eps)

    monkeypatch.setattr(BranchSet, "adamw_factor", reference_rule)
    assert run_proof("adamw eager", "3x3+1x1 stride 2", steps=20).max_rel_err > 1e-3


def test_zero_conv_scales_leave_exactly_the_identity():
    csla, target, scales = build_pair("3x3+1x1+identity", zero_scales=True)
    w = target[0].weight
    geometry = csla[0].geometry
    bs = BranchSet(geometry, scales["0"])
    expected = torch.zeros_like(w)
    for c in range(geometry.out_channels):
        expected[c, c, 1, 1] = scales["0"]["identity"][c]
    assert torch.equal(w, expected)
    assert torch.equal(bs.initial_kernel(dtype=torch.float64), expected)


def test_equivalent_kernel_gives_the_same_output():
    for name in BRANCH_SETS:
        csla, target, _ = build_pair(name)
        x = torch.randn(2, csla[0].geometry.in_channels, 9, 9, dtype=torch.float64)
        assert rel_err(target[0](x), csla[0](x)) < 1e-13, name
