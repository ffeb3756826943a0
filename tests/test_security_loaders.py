"""Files a user hands to repopt that could run code or exhaust memory (issue 20): crafted `.pt2` programs, the other
loaders of user files, gzip bombs in IDX files, and the fsync of the atomic writer.

Every crafted file carries a payload that would create a marker file; each test checks the marker never appears and
that the refusal is one sentence naming the file and the offending entry."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from repopt.app.cli import main
from repopt.quant import ProgramFileError, load_int8_program

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


class MarkerPayload:
    """Unpickling this creates the file `marker` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _info() -> dict:
    return {"format": "repopt-int8-pt2e", "input_shape": [3, 12, 12], "int8_batch_size": 1, "settings": {},
            "images_seen": 0, "config": {"method": "plain", "arch": "x", "dataset": "digits", "num_classes": 10}}


def _legacy_program_json() -> bytes:
    """A well-formed program (JSON) for torch.export's old layout, so that its loader reaches the pickles."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with zipfile.ZipFile(buffer) as z:
        return next(z.read(n) for n in z.namelist() if n.endswith("models/model.json"))


def legacy_pt2(path: Path, marker: Path) -> Path:
    """The archive of issue 20: repopt's metadata under a root folder, and torch.export's old layout at the top
    (version, serialized_exported_program.json, serialized_*.pt: the .pt entries are pickles with the payload)."""
    from torch._export.serde.schema import SCHEMA_VERSION

    payload = pickle.dumps(MarkerPayload(marker))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/extra/repopt.json", json.dumps(_info()))
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", _legacy_program_json())
        for part in ("state_dict", "constants", "example_inputs"):
            z.writestr(f"serialized_{part}.pt", payload)
    return path


def test_legacy_layout_pt2_runs_no_code(tmp_path, capsys):
    path = legacy_pt2(tmp_path / "evil.pt2", tmp_path / "marker")
    with pytest.raises(ProgramFileError) as e:
        load_int8_program(path)
    text = str(e.value)
    assert str(path) in text and "'version'" in text and "outside the archive's root folder" in text
    assert "\n" not in text
    code = main(["eval", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("repopt eval: error: ") and "'version'" in err and "\n" not in err
    assert not (tmp_path / "marker").exists()  # the payload never ran


@pytest.mark.parametrize("entry", ["archive/serialized_state_dict.pt", "archive/data/weights/model.pt",
                                   "archive/data/constants/model.pt", "archive/data/aotinductor/model/model.so",
                                   "archive/data/constants/custom_obj_0", "archive/models/other.json"])
def test_pt2_entries_repopt_never_writes_are_refused(tmp_path, entry):
    """Legacy pickles inside the root, a compiled AOTInductor library, custom objects, a second program: all refused
    by name, before torch reads anything."""
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/extra/repopt.json", json.dumps(_info()))
        z.writestr(entry, pickle.dumps(MarkerPayload(tmp_path / "marker")))
    with pytest.raises(ProgramFileError, match=f"entry '{entry}'"):
        load_int8_program(path)
    assert not (tmp_path / "marker").exists()


def test_duplicate_pt2_entries_are_refused(tmp_path):
    """Two entries of one name: Python's zip reader and torch's may each pick another one."""
    path = tmp_path / "dup.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/extra/repopt.json", json.dumps(_info()))
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("archive/extra/repopt.json", json.dumps(_info()))
    with pytest.raises(ProgramFileError, match="more than once"):
        load_int8_program(path)


# ---------------------------------------------------------------- the program's JSON (a genuine file, edited)

@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if not HAS_TORCHAO:
        pytest.skip("INT8 programs need the `quant` extra: pip install 'repopt[quant]'")
    from nets import conv_bn_net
    from repopt.quant import QuantSettings, quantize_ptq, save_int8_program

    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(2)]
    int8 = quantize_ptq(conv_bn_net(trained_bn_affine=False), calib, QuantSettings(calib_batches=2))
    path = tmp_path_factory.mktemp("pt2") / "q.pt2"
    save_int8_program(int8, path, {"config": {"method": "plain", "arch": "test", "dataset": "digits",
                                              "num_classes": 10}})
    return path


def _edit_program(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose models/model.json went through `edit(dict)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("models/model.json"):
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            zout.writestr(item, data)
    return dst


def _first(program: dict, key: str) -> dict:
    """The first dict in the program that holds `key`."""
    stack = [program]
    while stack:
        o = stack.pop(0)
        if isinstance(o, dict):
            if key in o:
                return o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    raise KeyError(key)


def test_symbolic_expression_with_code_is_refused(program, tmp_path):
    """torch parses each symbolic shape with sympy.sympify, which is eval: before, this file created the marker."""
    marker = tmp_path / "marker"

    def edit(p):
        holder = _first(p, "expr_str")
        holder["expr_str"] = f"{holder['expr_str']} + 0*len(str(open({str(marker)!r}, 'w')))"

    path = _edit_program(program, tmp_path / "sym.pt2", edit)
    with pytest.raises(ProgramFileError, match="symbolic expression"):
        load_int8_program(path)
    assert not marker.exists()


@pytest.mark.parametrize("what", ["guards", "target", "forward_arg_names", "parameter_name"])
def test_program_json_that_reaches_python_source_is_refused(program, tmp_path, what):
    """Guard code is exec'd when the module is built; call targets are looked up by getattr from torch (torch.os is
    os); argument names and parameter paths are pasted into the generated forward's source."""
    marker = tmp_path / "marker"
    code = f"open({str(marker)!r}, 'w')"

    def edit(p):
        if what == "guards":
            p["guards_code"] = [f"{code} is not None"]
        elif what == "target":
            node = next(n for n in p["graph_module"]["graph"]["nodes"] if n["target"].endswith("relu.default"))
            node["target"] = "torch.os.system"
        elif what == "forward_arg_names":
            _first(p, "forward_arg_names")["forward_arg_names"] = [f"input={code}"]
        else:
            holder = _first(p, "parameter_name")
            holder["parameter_name"] = f'0"), {code}, getattr(self, "x'

    path = _edit_program(program, tmp_path / f"{what}.pt2", edit)
    with pytest.raises(ProgramFileError) as e:
        load_int8_program(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_pt2_whose_entries_torch_reads_differently_is_refused(program, monkeypatch):
    """Python's zipfile does the checking and torch's own zip reader the loading: they must agree on the entries
    (a crafted zip can show two readers different files)."""
    from torch.export.pt2_archive import PT2ArchiveReader

    real = PT2ArchiveReader.get_file_names
    monkeypatch.setattr(PT2ArchiveReader, "get_file_names", lambda self: real(self) + ["data/constants/custom_obj_0"])
    with pytest.raises(ProgramFileError, match="torch's zip reader sees other entries .*custom_obj_0"):
        load_int8_program(program)


def test_genuine_program_loads_without_any_unpickling(program, monkeypatch):
    """The file repopt wrote loads through the new-format reader alone: torch.load only weights-only, no pickle."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle.loads called while loading a .pt2")

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    q, info = load_int8_program(program)
    assert calls and all(w is True for w in calls), calls
    assert info["config"]["arch"] == "test" and sum(q.quantized_ops().values()) == 3


# ---------------------------------------------------------------- IDX files: a gzip that expands beyond its header

def test_idx_gzip_bomb_is_read_no_further_than_its_header_declares(tmp_path):
    """A 100-byte image file whose gzip expands to 64 MiB: before, gzip.decompress held all 64 MiB in memory before
    the size check (and a bigger bomb, many GB); now the loader reads the declared 100 bytes plus one."""
    import tracemalloc
    import zlib

    from repopt.data.errors import DataError
    from repopt.data.idx import read_idx

    header = b"\x00\x00\x08\x03" + (1).to_bytes(4, "big") + (10).to_bytes(4, "big") * 2  # shape (1, 10, 10)
    expansion = 64 << 20
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    parts = [packer.compress(header)]
    zeros = bytes(1 << 20)
    parts += [packer.compress(zeros) for _ in range(expansion >> 20)]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"".join(parts) + packer.flush())
    assert path.stat().st_size < 200_000  # small on disk
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"longer than its header says: its header declares shape \(1, 10, 10\)"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"the loader held {peak} bytes for a file that declares 116"



def test_idx_gzip_whose_header_declares_more_than_it_can_hold_is_refused_before_inflating(tmp_path):
    """The same bomb with a header declaring 1 TiB: bounded by the header alone, the loader would inflate all 64 MiB;
    no gzip of this size can hold 1 TiB (deflate expands at most 1032:1), so it is refused before reading."""
    import tracemalloc
    import zlib

    from repopt.data.errors import DataError
    from repopt.data.idx import read_idx

    header = b"\x00\x00\x08\x03" + (1 << 20).to_bytes(4, "big") + (1 << 10).to_bytes(4, "big") * 2
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    body = [packer.compress(header)] + [packer.compress(zeros) for _ in range(64)]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"".join(body) + packer.flush())
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"is truncated: its header declares shape \(1048576, 1024, 1024\) \("
                                            r"1099511627792 bytes\), more than a gzip file of \d+ bytes can inflate"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"the loader held {peak} bytes"

# ---------------------------------------------------------------- atomic_write: fsync before the rename, and after

def _record_syncs(monkeypatch) -> list[str]:
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        events.append(("fsync dir" if stat.S_ISDIR(mode) else "fsync file", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from repopt._io import write_text

    target = tmp_path / "checkpoint.json"
    target.write_text("old")
    events = _record_syncs(monkeypatch)
    write_text(target, "new")
    assert [e for e, _ in events] == ["fsync file", "replace", "fsync dir"]
    assert events[0][1] == events[1][1] == target.stat().st_ino  # the file synced is the one renamed into place
    assert events[2][1] == tmp_path.stat().st_ino and target.read_text() == "new"


def test_atomic_write_where_the_folder_refuses_fsync_and_where_the_file_cannot_be_synced(tmp_path, monkeypatch):
    import errno
    import stat

    from repopt._io import WriteError, write_text

    real_fsync = os.fsync

    def folder_refuses(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", folder_refuses)
    write_text(tmp_path / "a.json", "new")  # the platform's refusal is not an error
    assert (tmp_path / "a.json").read_text() == "new"

    def disk_fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_fails)
    with pytest.raises(WriteError, match=r"a.json could not be written \(Input/output error\); the previous file"):
        write_text(tmp_path / "a.json", "newer")
    assert (tmp_path / "a.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# ---------------------------------------------------------------- CIFAR pickles: no uninitialised arrays

class _UninitialisedArray:
    """Pickles as numpy.ndarray((4096,), 'u1') called directly: an array of whatever memory held."""

    def __reduce__(self):
        import numpy as np

        return np.ndarray, ((4096,), "u1")


class _ReconstructedWithoutData:
    """Pickles as numpy's _reconstruct(ndarray, (4096,), b'b') with no __setstate__: the same, by another call."""

    def __reduce__(self):
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, (4096,), b"b")


@pytest.mark.parametrize("payload", [_UninitialisedArray, _ReconstructedWithoutData])
def test_cifar_pickle_cannot_make_an_uninitialised_array(tmp_path, payload):
    import numpy as np

    from repopt.data.errors import DataError
    from repopt.data.safe_pickle import load_plain_pickle

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": payload(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 is not a valid pickle \(UnpicklingError: refused numpy"):
        load_plain_pickle(path)
    # a real array still loads, under every protocol
    array = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps({"data": array, "labels": [3]}, protocol=protocol))
        assert np.array_equal(load_plain_pickle(path)["data"], array)


# ---------------------------------------------------------------- a model file's config: timm options that load files

class _FakeTimm:
    """Stands in for timm (not installed everywhere): create_model loads `checkpoint_path` the way timm does
    (torch.load, weights_only=False in timm's load_state_dict), so a path that reaches it runs the pickle."""

    @staticmethod
    def list_models():
        return ["resnet18"]

    @staticmethod
    def create_model(name, checkpoint_path=None, num_classes=10, pretrained=False, **_):
        if checkpoint_path:
            torch.load(checkpoint_path, weights_only=False)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


def test_model_file_config_cannot_make_timm_load_a_checkpoint(tmp_path, monkeypatch, capsys):
    from repopt.app.checkpoint import save_model
    from repopt.integrations import timm as timm_integration

    monkeypatch.setattr(timm_integration, "_timm", lambda: _FakeTimm)
    marker = tmp_path / "marker"
    evil = tmp_path / "weights.pth"
    evil.write_bytes(pickle.dumps(MarkerPayload(marker)))
    config = {"arch": "timm:resnet18", "method": "plain", "num_classes": 10, "dataset": "digits",
              "model_options": {"checkpoint_path": str(evil)}}
    path = tmp_path / "model.safetensors"
    save_model(path, torch.nn.Linear(1, 1), config)
    code = main(["eval", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'checkpoint_path' would make timm load a file" in err and str(path) in err, err
    assert not marker.exists()
