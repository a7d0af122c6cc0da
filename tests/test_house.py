"""House rules that a test can check: no import cycles among fewstep's modules."""
import subprocess
import sys

from conftest import ROOT


def test_no_import_cycles():
    r = subprocess.run([sys.executable, "tools/import_cycles.py"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout
    assert "0 cycles" in r.stdout
