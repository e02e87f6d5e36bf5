"""Every Triton module that lists COMPILE_CASES compiles for sm_90 (Triton's bundled ptxas, no
GPU needed). The interpreter does not type-check: the compiler catches what only it sees, e.g.
loop-carried values changing type. Runs in a fresh process: with TRITON_INTERPRET=1 the kernels
are not compilable objects."""
import os
import pkgutil
import subprocess
import sys

import pytest

import gtkernels.triton as triton_pkg
from gtkernels.triton import HAS_TRITON


def _modules_with_cases():
    names = []
    for info in pkgutil.iter_modules(triton_pkg.__path__):
        path = os.path.join(triton_pkg.__path__[0], info.name + ".py")
        if os.path.exists(path) and "COMPILE_CASES = [" in open(path).read():
            names.append(f"gtkernels.triton.{info.name}")
    return names


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("module", _modules_with_cases())
def test_kernels_compile_for_sm90(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    done = subprocess.run([sys.executable, script, module], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
