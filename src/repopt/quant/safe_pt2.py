"""Reading a torch.export archive (.pt2) so that nothing in the file can run code.

`torch.export.load` (torch 2.13, read in torch/export/__init__.py, torch/export/pt2_archive/_package.py,
torch/_export/serde/serialize.py, torch/export/_unlift.py, torch/fx/graph.py) runs code from the file along these
paths:
- when the new-format reader fails (e.g. there is no ROOT/archive_format), it falls back to the legacy layout at the
  archive's top (`version`, `serialized_*.pt`) and unpickles those with `torch.load(weights_only=False)`;
- pickled parts of the new layout: weights or constants marked `use_pickle` (`torch.load(weights_only=False)`),
  `custom_obj_*` and `opaque_obj_*` constants (torch's pickler, `pickle.loads`), the legacy `data/weights/MODEL.pt`,
  `data/constants/MODEL.pt` and the sample inputs (weights-only first, full unpickling after any failure);
- `data/aotinductor/`: a compiled library that is loaded and run;
- the program's JSON: symbolic shapes go through `sympy.sympify` (which is `eval`), `guards_code` is exec'd into the
  module's guard function, call targets are looked up by getattr from torch (`torch.os.system` resolves), and
  argument names and parameter paths are pasted into the Python source of the module's `forward`.
So the file is read once; only the entries repopt writes are admitted, all under one root folder; every tensor must
be raw bytes described by JSON; the sample inputs must load weights-only; the JSON's targets, symbolic expressions
and names must follow a small grammar, and it may carry no guard code. Then the same bytes go to the new-format
reader (`load_pt2`), never to `torch.export.load` and its fallback.
"""
from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import re
import zipfile

import torch

MODEL = "model"  # the program's name inside the archive (torch.export.save's)
# what torch.export.save writes for one program of plain tensors, relative to the root folder
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
          f"models/{MODEL}.json", f"data/weights/{MODEL}_weights_config.json",
          f"data/constants/{MODEL}_constants_config.json", f"data/sample_inputs/{MODEL}.pt"}
_NUMBERED = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+|extra/[\w.-]+", re.ASCII)
_ROOT = re.compile(r"[\w.-]+", re.ASCII)
_PAYLOADS = {"data/weights/": "weight_", "data/constants/": "tensor_"}  # folder -> the raw-tensor file prefix

# call targets: ATen and quantize/dequantize operators, and the getitem / symbolic-int operators of a graph
_TARGET = re.compile(r"torch\.ops\.(aten|quantized_decomposed)\.[A-Za-z_]\w*\.[A-Za-z_]\w*"
                     r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow|eq|ne|lt|le|gt|ge)", re.ASCII)
_TARGET_KEYS = ("target", "as_operator")
# names that end up in generated Python source (attribute paths, argument names), or name graph values
_PATH = re.compile(r"(\w+(\.\w+)*)?", re.ASCII)
_NAME_KEYS = ("name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn")
# what a symbolic shape may call: sympy's constructors and the functions torch's deserializer passes to sympify
_SYMPY_CALLS = {"Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
                "Le", "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "FloorDiv", "ModularIndexing", "Where",
                "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
                "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
                "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"}
_WORD = re.compile(r"[A-Za-z]\w*", re.ASCII)  # a symbol or keyword name: no dunders
_BUILTINS = set(dir(builtins))  # sympify's namespace holds Python's builtins: a bare `open` must not resolve to one
_SYMPY_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
                ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd)


class ProgramFileError(ValueError):
    """A .pt2 file that is not a quantized program repopt wrote, or that would need unpickling to load."""


def read_archive(path: str) -> tuple[bytes, zipfile.ZipFile]:
    """The bytes of the file at `path` and a zip reader over those same bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data, zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as e:
        raise ProgramFileError(f"{path}: not a torch.export archive ({e})") from None


def load_program(path: str, data: bytes, archive: zipfile.ZipFile):
    """(ExportedProgram, extra files) of the archive `data` read from `path`, after `check_archive`; loaded by the
    new-format reader alone. ProgramFileError if torch cannot read it."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive._package import load_pt2  # what torch.export.load calls before its fallback

    check_archive(path, archive)
    try:
        # torch's zip reader (miniz) must see exactly the entries Python's zipfile checked
        records = set(PT2ArchiveReader(io.BytesIO(data)).get_file_names())
    except Exception:  # noqa: BLE001 - torch's reader refuses what Python's accepted
        records = None
    checked = {name.split("/", 1)[1] for name in archive.namelist()}
    if records != checked:
        unchecked = sorted(records - checked) if records is not None else []
        raise ProgramFileError(f"{path}: torch's zip reader sees other entries than the ones checked"
                               f"{f' ({unchecked[0]!r})' if unchecked else ''}; refused")
    try:
        contents = load_pt2(io.BytesIO(data))
        return contents.exported_programs[MODEL], contents.extra_files
    except Exception as e:  # noqa: BLE001 - a checked archive torch cannot read is a bad file, never code to run
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ProgramFileError(f"{path}: torch.export cannot read its program ({type(e).__name__}: "
                               f"{reason[:200]})") from None


def check_archive(path: str, archive: zipfile.ZipFile) -> None:
    """Raise ProgramFileError (one sentence naming the entry) unless every entry of `archive` is one the loader reads
    as raw tensors, JSON, text or weights-only tensors, and the program's JSON can reach no Python code."""
    names = archive.namelist()
    if not names:
        raise ProgramFileError(f"{path}: an empty zip archive, not a torch.export program")
    root = names[0].split("/", 1)[0]  # torch's reader takes the first entry's folder as the root
    seen = set()
    for name in names:
        _check_entry(path, name, root, seen)
    missing = sorted(_FIXED - {".data/serialization_id", "byteorder"} - {n.split("/", 1)[1] for n in names})
    if missing:
        raise ProgramFileError(f"{path}: entry '{root}/{missing[0]}' is missing; not a whole torch.export program")
    for folder, prefix in _PAYLOADS.items():
        kind = folder.split("/")[1]
        _check_payload_config(path, archive, root, f"{folder}{MODEL}_{kind}_config.json", folder, prefix)
    _check_sample_inputs(path, archive, f"{root}/data/sample_inputs/{MODEL}.pt")
    _check_program_json(path, archive, f"{root}/models/{MODEL}.json")


def _check_entry(path: str, name: str, root: str, seen: set) -> None:
    if name in seen:
        raise ProgramFileError(f"{path}: entry '{name}' appears more than once (zip readers disagree on which one "
                               f"counts); refused")
    seen.add(name)
    file = name.rsplit("/", 1)[-1]
    if file.startswith("serialized_"):
        raise ProgramFileError(f"{path}: entry '{name}' is part of torch.export's legacy (pickled) layout, whose "
                               f"loading could run code; refused")
    folder, _, rest = name.partition("/")
    if folder != root or not _ROOT.fullmatch(root) or root in (".", ".."):
        raise ProgramFileError(f"{path}: entry '{name}' lies outside the archive's root folder '{root}' (torch.export "
                               f"would read it as its legacy, pickled layout, which could run code); refused")
    if rest not in _FIXED and not _NUMBERED.fullmatch(rest):
        raise ProgramFileError(f"{path}: entry '{name}' is not one repopt writes (it could hold a pickle or compiled "
                               f"code that loading would run); refused")


def _check_payload_config(path, archive, root, config_name, folder, prefix) -> None:
    try:
        config = json.loads(archive.read(f"{root}/{config_name}"))["config"]
        entries = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ProgramFileError(f"{path}: {root}/{config_name} is not a torch.export payload config") from None
    names = set(archive.namelist())
    for key, entry in entries:
        file = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False or not isinstance(file, str) \
                or not re.fullmatch(rf"{prefix}\d+", file) or not isinstance(entry.get("tensor_meta"), dict):
            raise ProgramFileError(f"{path}: entry {key!r} would have to be unpickled, which could run code; refused "
                                   f"(repopt writes plain tensors only)")
        if not isinstance(key, str) or not _PATH.fullmatch(key) or not key:
            raise ProgramFileError(f"{path}: {root}/{config_name} names a tensor {key!r} that is not a dotted path "
                                   f"of words; refused")
        if f"{root}/{folder}{file}" not in names:
            raise ProgramFileError(f"{path}: entry {key!r} points to {root}/{folder}{file}, which is missing")


def _check_sample_inputs(path, archive, name) -> None:
    try:
        inputs = torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means torch would retry with full unpickling
        inputs = None
    if not isinstance(inputs, (tuple, dict)):
        raise ProgramFileError(f"{path}: its sample inputs ({name}) cannot be loaded weights-only as a tuple "
                               f"(torch would then unpickle them, which could run code); refused")


def _check_program_json(path, archive, name) -> None:
    try:
        program = json.loads(archive.read(name))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProgramFileError(f"{path}: {name} is not valid JSON (or nests too deeply)") from None
    if not isinstance(program, dict):
        raise ProgramFileError(f"{path}: {name} is not a torch.export program")
    if program.get("guards_code", []) != []:
        raise ProgramFileError(f"{path}: {name} carries guard code (Python that building the module would run); "
                               f"repopt's programs carry none; refused")
    for key, value in _strings(program):
        if key in _TARGET_KEYS and not _TARGET.fullmatch(value):
            raise ProgramFileError(f"{path}: {name} calls {value[:80]!r}, which is not an ATen or quantize operator; "
                                   f"refused")
        if key == "expr_str" and not _is_plain_expression(value):
            raise ProgramFileError(f"{path}: {name} holds a symbolic expression {value[:80]!r} that is not plain "
                                   f"arithmetic on symbols (torch evaluates it with sympy, which could run code); "
                                   f"refused")
        if (key in _NAME_KEYS and not _PATH.fullmatch(value)) or (key == "forward_arg_names" and not (
                value.isidentifier() and value.isascii() and not keyword.iskeyword(value))):
            raise ProgramFileError(f"{path}: {name} gives {key} as {value[:80]!r}, which is not a plain name (it "
                                   f"would be pasted into generated Python source); refused")


def _strings(value):
    """(key, string) for every string in a JSON value, with the key of the nearest enclosing dict entry (a stack, not
    recursion: the nesting depth is the file's choice)."""
    stack = [(None, value)]
    while stack:
        key, o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.items())
        elif isinstance(o, list):
            stack.extend((key, v) for v in o)
        elif isinstance(o, str):
            yield key, o


def _is_plain_expression(text: str) -> bool:
    """True if `text` parses as arithmetic on names and numbers that calls only sympy's constructors and torch's
    shape functions, with constant keyword arguments: nothing sympify evaluates then reaches other code."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and not (_WORD.fullmatch(node.id) and node.id not in _BUILTINS):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
            return False
        if isinstance(node, ast.keyword) and not (node.arg and _WORD.fullmatch(node.arg)
                                                  and isinstance(node.value, ast.Constant)):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _PATH.fullmatch(node.value):
            return False
    return True

