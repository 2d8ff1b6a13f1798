"""scripts/check_imports.py: tunefast has no cycle among module-level imports, and the check can fail."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_imports", module)  # dataclasses look their module up by name
    spec.loader.exec_module(sys.modules["check_imports"])
    return sys.modules["check_imports"]


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path / "pkg"


def test_tunefast_has_no_module_level_import_cycle():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: no cycle" in run.stdout


def test_a_cycle_in_a_synthetic_package_fails_and_is_printed(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from .. import c\n",
        "c.py": "import pkg.a as a\n",
        "d.py": "def f():\n    from . import a\n",  # function-level: never a failure
    })
    run = subprocess.run([sys.executable, str(SCRIPT), str(pkg)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL: 1 import cycle" in run.stdout
    assert "pkg.a (line 1) -> pkg.sub.b" in run.stdout and "pkg.c (line 1) -> pkg.a" in run.stdout
    assert "pkg.d" not in run.stdout.split("FAIL")[1]


def test_function_level_and_type_checking_imports_are_not_cycles(tmp_path):
    check = _script()
    pkg = _package(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nfrom .b import helper\n",
        "b.py": "def helper():\n    from .a import thing\n    return thing\n",
    })
    graph = check.build(pkg)
    assert graph.module_level == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 4}}
    assert graph.function_level == {"pkg.b": {"pkg.a": 2}}
    assert check.cycles(graph.module_level) == []
    assert check.main([str(pkg)]) == 0
    # the same import moved to module level is a cycle
    (pkg / "b.py").write_text("from .a import thing\n")
    assert check.cycles(check.build(pkg).module_level) == [["pkg.a", "pkg.b"]]
    assert check.main([str(pkg)]) == 1
