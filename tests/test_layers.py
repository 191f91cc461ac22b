"""The one-way house: every program starts without APL-mini unless it needs it, and the import contracts hold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, train_env

# Runs one program as `python PROGRAM ARGS` would, then reports which apl_jax modules it imported.
DRIVER = """
import json, runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print("MODULES " + json.dumps({"code": code, "mini": sorted(m for m in sys.modules if m.startswith("apl_jax.mini"))}))
"""


def imported(target: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", DRIVER, target, *args], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)
    line = next(line for line in done.stdout.splitlines() if line.startswith("MODULES "))
    return json.loads(line[len("MODULES "):])


@pytest.mark.parametrize("target", ["train.py", "sample.py", "apl_jax.export", "apl_jax.generate_identities",
                                    "apl_jax.evaluate", "apl_jax.tokenizer"])
def test_programs_start_without_apl_mini(target):
    assert imported(target, "--help") == {"code": 0, "mini": []}


def test_apl_mini_program_imports_apl_mini():
    result = imported("apl_jax.mini", "--help")
    assert result["code"] == 0 and "apl_jax.mini" in result["mini"]  # its __main__ runs as __main__


def test_training_another_model_never_imports_apl_mini(tmp_path):
    result = imported("train.py", "--config", str(REPO / "configs/tiny.yaml"), "--workdir", str(tmp_path),
                      "--set", "train.steps=2", "--set", "eval.after_training=true")
    assert result == {"code": 0, "mini": []}
    assert (tmp_path / "prefix.safetensors").is_file()


LINT = Path(sys.executable).parent / "lint-imports"  # installed beside this Python by requirements-test.txt


@pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed (requirements-test.txt)")
def test_import_contracts_hold():
    done = subprocess.run([str(LINT)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout
