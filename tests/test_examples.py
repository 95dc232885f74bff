"""The examples run and say they are right."""

import os
import subprocess
import sys

import pytest

from conftest import need

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")

pytestmark = pytest.mark.kernel


def test_lazy_region():
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no userfaultfd access")
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "lazy_region.py"), "--pages", "32"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "32 faults served, 32 of 32 pages correct"
