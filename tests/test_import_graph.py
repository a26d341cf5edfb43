"""The import graph goes one way down the layers (scripts/check_import_graph.py), and the checker sees
every kind of import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_import_graph.py"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


def test_autopetseg_import_graph_has_no_violation():
    violations, n_modules = checker.check()
    assert n_modules > 20
    assert [str(v) for v in violations] == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "autopetseg"
    for name, text in {"__init__.py": "", "errors.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != root and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("")
        path.write_text(textwrap.dedent(text))
    return root


def _violations(root: Path) -> set[str]:
    return {str(v) for v in checker.check(root)[0]}


def test_clean_package(tmp_path):
    root = _package(tmp_path, {
        "data/a.py": "from autopetseg.errors import x\nimport autopetseg.data.b\n",
        "data/b.py": "from . import a\nfrom .a import y\n",
        "planning/p.py": "from autopetseg.data import a\nfrom ..data.b import z\nimport autopetseg\n",
        "cli.py": "from autopetseg import pipeline, demo\nfrom autopetseg.training import t\n",
        "pipeline.py": "",
        "demo.py": "",
        "training/t.py": "from autopetseg.models import m\nfrom autopetseg.scoring import s\n",
        "models/m.py": "",
        "scoring/s.py": "",
    })
    assert _violations(root) == set()
    assert checker.check(root)[1] == 16


@pytest.mark.parametrize(
    "files, expected",
    [
        # upward, module level
        ({"data/a.py": "from autopetseg.planning.plans import P\n", "planning/plans.py": ""},
         "autopetseg.data.a -> autopetseg.planning.plans (layer 2 planning above layer 1 data)"),
        # upward, inside a function, ``import x.y``
        ({"models/m.py": "def f():\n    import autopetseg.training.trainer\n", "training/trainer.py": ""},
         "autopetseg.models.m -> autopetseg.training.trainer (layer 5 training above layer 4 models)"),
        # same layer, other package
        ({"inference/e.py": "from autopetseg.training.run import go\n", "training/run.py": ""},
         "autopetseg.inference.e -> autopetseg.training.run "
         "(layer 5 training beside layer 5 inference: same layer, other package)"),
        ({"scoring/s.py": "from autopetseg.data import loading\n", "data/loading.py": ""},
         "autopetseg.scoring.s -> autopetseg.data.loading (layer 1 data beside layer 1 scoring: same layer, other package)"),
        # ``from autopetseg import <sub-package>``
        ({"planning/p.py": "from autopetseg import inference\n", "inference/__init__.py": ""},
         "autopetseg.planning.p -> autopetseg.inference (layer 5 inference above layer 2 planning)"),
        # relative import leaving the package
        ({"data/a.py": "from ..models.m import M\n", "models/m.py": ""},
         "autopetseg.data.a -> autopetseg.models.m (layer 4 models above layer 1 data)"),
        # a package's __init__ (relative to the package itself)
        ({"preprocessing/__init__.py": "from ..evaluation import report\n", "evaluation/report.py": ""},
         "autopetseg.preprocessing -> autopetseg.evaluation.report (layer 6 evaluation above layer 3 preprocessing)"),
        # the base layer importing anything above it
        ({"io_utils.py": "if True:\n    from autopetseg.data.records import R\n", "data/records.py": ""},
         "autopetseg.io_utils -> autopetseg.data.records (layer 1 data above layer 0 base)"),
        # importlib with a literal name
        ({"models/m.py": "import importlib\nimportlib.import_module('autopetseg.cli')\n", "cli.py": ""},
         "autopetseg.models.m -> autopetseg.cli (layer 7 entry points above layer 4 models)"),
        # a module outside every layer
        ({"extras/x.py": ""}, "autopetseg.extras.x -> autopetseg.extras.x (belongs to no layer: add it to LAYERS)"),
    ],
)
def test_violations_are_found(tmp_path, files, expected):
    assert expected in _violations(_package(tmp_path, files))


def test_script_exit_status(tmp_path):
    ok = subprocess.run([sys.executable, str(SCRIPT), str(_package(tmp_path / "a", {}))], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "import graph OK (2 modules)"
    bad_root = _package(tmp_path / "b", {"data/a.py": "import autopetseg.training\n", "training/__init__.py": ""})
    bad = subprocess.run([sys.executable, str(SCRIPT), str(bad_root)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "autopetseg.data.a -> autopetseg.training (layer 5 training above layer 1 data)"
