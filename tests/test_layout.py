"""The two layers stay apart: the library (everything under repopt/ but app/) never imports the application (repopt.app),
and repopt._io, the one atomic writer, imports nothing of repopt."""
import ast
from pathlib import Path

import repopt

PACKAGE = Path(repopt.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the repopt modules `path` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name == "repopt" or name.startswith("repopt.")}


def test_the_library_never_imports_the_application():
    library = [p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts
               and p.name != "__main__.py"]
    assert len(library) > 20
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("repopt.app"))
                 for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_io_module_is_a_leaf():
    assert _imports(PACKAGE / "_io.py") == set()
