"""timm's own model tests (tests/test_models.py of the installed timm release) run on our models: the
factory arguments (device, dtype), reset_classifier, pruning, features, scripting, fx, as timm holds
its own models to them. The wheel ships no tests, so they come from timm's source distribution on PyPI;
where PyPI cannot be reached the test is skipped, except in CI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

# nano in every per-model test; F0 and F0+ (their configs and tags) in the config test: what the others run on F0
# (forward, backward, fx, TorchScript, features) tests/test_compat.py checks against eager, and they cost a minute.
# pretrained: downloads.
SELECTION = "(nfnet_hub_nano or (nfnet_hub_f0 and default_cfgs)) and not pretrained"


@pytest.fixture(scope="module")
def timm_tests(tmp_path_factory) -> Path:
    """timm's tests/ (and the pytest settings beside them) for the installed version, without its sources:
    the tests import the installed timm."""
    where = tmp_path_factory.mktemp("timm-sdist")
    got = subprocess.run([sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary",
                          ":all:", "--no-deps", "--quiet", "-d", str(where)],
                         capture_output=True, text=True, timeout=300)
    archives = list(where.glob("timm-*.tar.gz"))
    if got.returncode or not archives:
        if os.environ.get("CI"):
            pytest.fail(f"cannot download timm {timm.__version__}'s source distribution: {got.stderr[-2000:]}")
        pytest.skip(f"timm {timm.__version__}'s source distribution cannot be downloaded here (PyPI unreachable?)")
    with tarfile.open(archives[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        wanted = [m for m in tar.getmembers()
                  if m.name.startswith(f"{top}/tests/") or m.name == f"{top}/pyproject.toml"]
        tar.extractall(where, members=wanted, filter="data")
    return where / top


def test_timms_own_model_tests_pass_on_our_models(timm_tests):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "nfnet_hub", "-p", "no:cacheprovider",
                          "tests/test_models.py", "-k", SELECTION], cwd=timm_tests, capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", run.stdout).group(1))
    assert passed >= 14, run.stdout[-3000:]  # nano's 11 per-model tests, and F0's and F0+'s configs
