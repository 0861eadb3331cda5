#!/usr/bin/env python
"""Environment check for the course: ``python scripts/check_env.py`` (same as ``kvcourse-check-env``).

Works from a source checkout before ``pip install -e .``: it puts the checkout on ``sys.path`` first.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refimpl.check_env import main  # after the sys.path line on purpose

if __name__ == "__main__":
    raise SystemExit(main())
