#!/usr/bin/env python
"""Same as `fewstep eval compare ...`: teacher at 1..50 steps vs students, as JSON, Markdown and a PNG plot."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", "compare", *sys.argv[1:]]))
