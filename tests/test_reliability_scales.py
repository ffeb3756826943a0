"""Bad scales files, through `repopt train --scales` and `repopt scales import|show`: exit code 2, one sentence naming
the file (and the layer where there is one), nothing on disk changed, no pickled code run. Cases: reliability_cases.py.
"""
import pytest
import torch
from reliability_kit import MARKER, RunsCode, cases, run_case

import repopt
from repopt.models import create


@pytest.mark.parametrize("case", cases("scales"), ids=lambda c: c.id)
def test_cli_refuses_bad_scales(case, tmp_path):
    code, err, line = run_case(case, tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert all(word in line for word in case.expect), line


def test_identity_on_a_stride_2_conv_names_the_layer_and_the_stride():
    # the CLI case above hits a stride-2 conv that also changes width; here only the stride is wrong
    model = create("repopt_vgg_tiny", strides=(1, 2, 2, 2, 2))
    assert model.stage1[0].conv.in_channels == model.stage1[0].conv.out_channels == 16
    scales = repopt.extract_scales(create("repopt_vgg_tiny", mode="hs"))
    scales["stage1.0.conv"]["identity"] = torch.ones(16)
    with pytest.raises(repopt.ScalesError, match=r"'stage1\.0\.conv'.*identity.*stride \(2, 2\) is not 1"):
        scales.bind(model)


def test_the_malicious_pth_is_live_and_load_scales_never_runs_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"stage0.scale_conv.weight": torch.ones(16), "x": RunsCode(tmp_path)}, path)
    with pytest.raises(repopt.ScalesError, match=r"evil\.pth: refused to load: .*system"):
        repopt.load_scales(path)
    assert not (tmp_path / MARKER).exists()
    # the refusal is not vacuous: a plain (unsafe) torch.load of the same file does run the payload
    torch.load(path, weights_only=False)
    assert (tmp_path / MARKER).exists()


def test_loaded_scales_are_finite_or_refused(tmp_path):
    scales = repopt.extract_scales(create("repopt_vgg_tiny", mode="hs"))
    scales["stage0.conv"]["1x1"] = torch.tensor([float("-inf")] * 16)
    path = repopt.save_scales(scales, tmp_path / "s.safetensors")  # saving is allowed: the file is evidence
    with pytest.raises(repopt.ScalesError, match=r"s\.safetensors: layer 'stage0\.conv' branch '1x1' holds NaN"):
        repopt.load_scales(path)


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    # safetensors begins with the little-endian header length: its first byte can be 0x80, a pickle's first byte
    scales = repopt.extract_scales(create("repopt_vgg_tiny", mode="hs"))
    for pad in range(256):
        path = repopt.save_scales(scales, tmp_path / "s.safetensors", note="x" * pad)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    loaded = repopt.load_scales(path)
    assert all(torch.equal(loaded[n][b], scales[n][b]) for n in scales for b in scales[n])
