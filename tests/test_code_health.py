"""What the code review asked of the code itself: every kerasbig module imports into one process without absl
flag clashes, library code takes arguments instead of reading flags, and no function or class is dead."""
import ast
import re
import subprocess
import sys

from conftest import REPO

ENTRY_POINTS = ("train", "generate", "bench", "serve", "predict", "export")


def test_every_entry_point_imports_into_one_process_without_defining_flags():
    script = f"""
import importlib
from absl import flags
for name in {ENTRY_POINTS!r}:
    importlib.import_module("kerasbig." + name)
print(sorted(name for name in flags.FLAGS if name in ("workdir", "seed", "model_name", "verbose", "config")))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_callbacks_are_made_without_parsed_flags(tmp_path):
    from kerasbig import config as config_lib
    from kerasbig.callbacks import Dashboard, ProfileSteps
    from kerasbig.data.digits import load_digits
    from kerasbig.train import make_callbacks

    callbacks = make_callbacks(config_lib.base(), tmp_path, task=load_digits(), total_steps=10, flops_per_step=None,
                               run_info={"seed": 3, "mixed_precision": "float32", "replicas": 1},
                               profile_steps=(2, 3))
    dashboard = next(c for c in callbacks if isinstance(c, Dashboard))
    assert dashboard.hparams["run.seed"] == 3 and any(isinstance(c, ProfileSteps) for c in callbacks)


def _definitions() -> dict[str, str]:
    """Top-level functions and classes of the package: name -> the module that defines it."""
    found = {}
    for path in sorted((REPO / "kerasbig").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found[node.name] = str(path.relative_to(REPO))
    return found


def test_no_function_or_class_is_dead():
    """Each top-level function and class is used somewhere in the package, its configs or an entry point's
    `__main__` (tests alone do not count: code that only tests use is dead to users)."""
    sources = {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "kerasbig").rglob("*.py")}
    sources.update({str(p.relative_to(REPO)): p.read_text() for p in (REPO / "configs").glob("*.py")})
    dead = []
    for name, module in _definitions().items():
        uses = sum(len(re.findall(rf"\b{re.escape(name)}\b", text)) for text in sources.values())
        if uses < 2:  # the definition itself is one
            dead.append(f"{module}: {name}")
    assert not dead, dead
