#!/usr/bin/env python
"""Same as `fewstep eval fid ...` (see `fewstep eval fid --help`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", "fid", *sys.argv[1:]]))
