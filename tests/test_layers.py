"""The package's layers (CONTRIBUTING.md): the core loads on torch alone, and import-linter holds every folder to
the layer rules written in setup.cfg's [importlinter] contracts."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_the_core_imports_neither_transformers_nor_deepspeed():
    code = ("import sys, pg_deepspeed; from pg_deepspeed import PrefixGroupLayout, PrefixTreeLayout, "
            "prefix_grouper_attention; loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'deepspeed')); assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_import_follows_the_layer_contracts():
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 kept, 0 broken" in run.stdout


def test_an_old_import_path_still_works_and_says_where_the_module_went():
    code = ("import warnings; warnings.simplefilter('error'); import pg_deepspeed.patch")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert "FutureWarning: pg_deepspeed.patch moved to pg_deepspeed.models.patch" in run.stderr
    code = ("import warnings; warnings.simplefilter('ignore'); from pg_deepspeed.build import build_model; "
            "import pg_deepspeed.distributed.engines as new; assert build_model is new.build_model")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
