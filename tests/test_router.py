"""The router (repopt/optim/base.py): every target weight is assigned its path (the optimizer's PATHS table) before any
parameter or state changes, so a backend that cannot ready its code on the first step (Triton's compile: no host C
compiler, too old a driver) changes nothing: with triton=None the step then runs on the eager path, with one warning
that names the cause; with triton=True it is refused in one sentence. And each path is taken where the table says,
as `last_step_paths` records, with the same result as a weight stepped alone on that path.

The Triton path runs here on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py); the
compile failure is injected through `triton_kernels.warm_up`."""
import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from repopt import RepOptAdamW, RepOptLion, RepOptSGD
from repopt.optim import base, native, sgd, triton_kernels
from repopt.optim.paths import PathUnavailable

from test_native import _branch_set
from test_optim import batches, scales_for, small_net

needs_triton = pytest.mark.skipif(triton_kernels.usable(torch.device("cpu")) is not None,
                                  reason=str(triton_kernels.usable(torch.device("cpu"))))
needs_native = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.build_error()}")

CAUSE = "the Triton driver helper needs a host C compiler and none was found (simulated)"
# every optimizer with the flags that give it the most state: momentum buffers, AdamW's step count and amsgrad
CASES = [(RepOptSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), "sgd"),
         (RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True), "adamw"),
         (RepOptLion, dict(lr=1e-3, weight_decay=0.1), "lion")]
EAGER = {RepOptSGD: "blocks", RepOptAdamW: "eager", RepOptLion: "eager"}


def _snapshot(net, opt):
    """The parameters and the whole optimizer state (every tensor cloned, the step counts included)."""
    return [p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict())


def _same(snapshot, net, opt) -> bool:
    params, sd = snapshot
    now = opt.state_dict()
    if now["state"].keys() != sd["state"].keys():  # no entry added either
        return False
    if not all(torch.equal(a, b) for a, b in zip(params, net.parameters())):
        return False
    return all(now["state"][i].keys() == s.keys() and all(torch.equal(torch.as_tensor(now["state"][i][k]),
                                                                      torch.as_tensor(v)) for k, v in s.items())
               for i, s in sd["state"].items())


def _seeded():
    return torch.Generator().manual_seed(0)  # the rule of initialization draws from it


def _grads(net, x, y):
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()


def _failing_warm_up(calls, check):
    def warm_up(kind, group, params):
        calls.append(kind)
        check()  # nothing has changed when the backend is asked to ready its code
        raise PathUnavailable(CAUSE)
    return warm_up


@needs_triton
@pytest.mark.parametrize("earlier", [0, 1], ids=["first step", "later step"])
@pytest.mark.parametrize("cls,kw,kind", CASES, ids=[c[2] for c in CASES])
def test_a_failed_warm_up_changes_nothing_then_the_eager_path_runs(monkeypatch, cls, kw, kind, earlier):
    monkeypatch.setattr(base, "_triton_by_default", lambda device: True)  # triton=None routes these CPU weights
    data = batches(earlier + 2)
    ref_net, net = small_net(), small_net()
    ref = cls.from_scales(ref_net, scales_for(ref_net), native=False, triton=False, generator=_seeded(), **kw)
    opt = cls.from_scales(net, scales_for(net), native=False, triton=None, generator=_seeded(), **kw)
    calls, snapshot = [], []
    monkeypatch.setattr(triton_kernels, "warm_up", _failing_warm_up(calls, lambda: snapshot.append(
        _same(snapshot[0], net, opt))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(data):
            _grads(ref_net, x, y)
            _grads(net, x, y)
            opt.triton = False if i < earlier else opt.triton  # the earlier steps: state exists at the failure
            if i == earlier:
                opt.triton = None
                snapshot.append(_snapshot(net, opt))
            ref.step()
            opt.step()
            if i == earlier:
                assert opt.last_step_paths == Counter({EAGER[cls]: 2})
    assert calls == [kind] and snapshot[1:] == [True]  # asked once; everything untouched when it failed
    ours = [w for w in caught if "other paths" in str(w.message)]
    assert len(ours) == 1 and CAUSE in str(ours[0].message), [str(w.message) for w in caught]
    assert all(torch.equal(a, b) for a, b in zip(ref_net.parameters(), net.parameters()))
    assert _same(_snapshot(ref_net, ref), net, opt)  # the eager path's state, bit for bit


@needs_triton
@pytest.mark.parametrize("earlier", [0, 1], ids=["first step", "later step"])
@pytest.mark.parametrize("cls,kw,kind", CASES, ids=[c[2] for c in CASES])
def test_triton_true_refuses_a_failed_warm_up_in_one_sentence_and_changes_nothing(monkeypatch, cls, kw, kind,
                                                                                   earlier):
    net = small_net()
    opt = cls.from_scales(net, scales_for(net), native=False, triton=True, **kw)
    calls = []
    monkeypatch.setattr(triton_kernels, "warm_up", _failing_warm_up(calls, lambda: None))
    data = batches(earlier + 1)
    for x, y in data[:earlier]:
        _grads(net, x, y)
        opt.triton = False
        opt.step()
    opt.triton = True
    _grads(net, *data[earlier])
    before = _snapshot(net, opt)
    with pytest.raises(PathUnavailable) as raised:
        opt.step()
    message = str(raised.value)
    assert message == f"{cls.__name__}(triton=True): {CAUSE}" and "\n" not in message
    assert calls == [kind] and _same(before, net, opt)
    assert opt.last_step_paths == Counter()


@needs_triton
def test_warm_up_is_given_each_groups_triton_weights_before_the_step():
    net = small_net()
    opt = RepOptSGD.from_scales(net, scales_for(net), lr=0.1, momentum=0.9, triton=True)
    seen = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(triton_kernels, "warm_up", lambda kind, group, params: seen.append((kind, params)))
        _grads(net, *batches(1)[0])
        opt.step()
    targets = [net[0].weight, net[3].weight]
    assert [(k, [id(p) for p in ps]) for k, ps in seen] == [("sgd", [id(p) for p in targets])]
    assert opt.last_step_paths == Counter({"triton": 2})


def _weights(seed=0):
    """Target weights that the table sends to different paths on CPU, and their multipliers: float32 and float64
    (native, one call per dtype), a full-size tensor multiplier (no native form: blocks), a layout that cannot be cut
    into row blocks (whole tensors)."""
    g = torch.Generator().manual_seed(seed)
    ws = {"f32": nn.Parameter(torch.randn(8, 8, 3, 3, generator=g)),
          "f64": nn.Parameter(torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64)),
          "fixed": nn.Parameter(torch.randn(8, 8, 3, 3, generator=g)),
          "permuted": nn.Parameter(torch.randn(3, 3, 8, 8, generator=g).permute(2, 3, 0, 1))}
    mults = {"f32": _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=1),
             "f64": _branch_set(8, 8, 3, 1, ("3x3", "1x1"), seed=2),
             "fixed": torch.rand(8, 8, 3, 3, generator=g) + 0.5,
             "permuted": _branch_set(8, 8, 3, 1, ("3x3", "identity"), seed=3)}
    for w in ws.values():  # a gradient of w's layout
        w.grad = torch.empty_like(w).copy_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    return ws, mults


def _step(cls, names, kw, seed=0):
    ws, mults = _weights(seed)
    bias = nn.Parameter(torch.randn(8))  # a plain parameter in the same group
    bias.grad = torch.randn(8)
    opt = cls([ws[n] for n in names] + [bias], grad_mults={ws[n]: mults[n] for n in names}, **kw)
    opt.step()
    return opt, {n: ws[n].detach() for n in names}


@needs_native
@pytest.mark.parametrize("cls,kw,expected", [
    (RepOptSGD, dict(lr=0.1, momentum=0.9), {"f32": "native", "f64": "native", "fixed": "blocks",
                                             "permuted": "whole"}),
    (RepOptAdamW, dict(lr=1e-2), {"f32": "native", "f64": "native", "permuted": "eager"}),
    (RepOptLion, dict(lr=1e-3), {"f32": "native", "f64": "native", "fixed": "eager", "permuted": "eager"}),
], ids=["sgd", "adamw", "lion"])
def test_each_weight_takes_the_path_of_the_table_and_steps_as_on_its_own(cls, kw, expected):
    opt, mixed = _step(cls, list(expected), kw)
    assert opt.last_step_paths == Counter(expected.values())
    for name, path in expected.items():
        alone = dict(native=path == "native", scratch_bytes=0) if path == "whole" else dict(native=path == "native")
        single, result = _step(cls, [name], {**kw, **(alone if cls is RepOptSGD else dict(native=path == "native"))})
        assert single.last_path == path
        assert torch.equal(mixed[name], result[name]), name


@needs_triton
def test_triton_takes_branch_scales_and_leaves_the_rest_to_the_next_rows():
    opt, _ = _step(RepOptSGD, ["f32", "fixed", "permuted"], dict(lr=0.1, momentum=0.9, triton=True))
    assert opt.last_step_paths == Counter({"triton": 1, "blocks": 1, "whole": 1})


def test_the_compiled_row_comes_first_when_asked_for(monkeypatch):
    taken = []
    monkeypatch.setattr(sgd, "step_compiled", lambda group, p, *args: taken.append(p))  # the routing, not the compile
    with pytest.warns(FutureWarning, match=r"RepOptSGD\(compiled=True\) is deprecated and will be removed"):
        opt, ws = _step(RepOptSGD, ["f32", "permuted"], dict(lr=0.1, momentum=0.9, compiled=True))
    assert opt.last_step_paths == Counter({"compiled": 1, "whole": 1}) and taken == [opt.param_groups[0]["params"][0]]


def test_cuda_weights_without_triton_are_told_once_which_path_runs_and_what_it_costs(monkeypatch):
    why = "triton cannot be imported (ModuleNotFoundError: No module named 'triton'); pip install 'repopt[triton]'"
    monkeypatch.setattr(triton_kernels, "usable", lambda device: why)
    opt, _ = _step(RepOptSGD, ["f32"], dict(lr=0.1))
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            assert opt._opens_triton(opt.param_groups[0], torch.device("cuda")) is False
    assert len(record) == 1
    message = str(record[0].message)
    assert why in message and "eager path" in message and "pass of its own over each gradient" in message
