"""Where the project's shared reference data lives (`shared/reference/`, beside the checkout).

CI runs a fresh clone with `shared/` beside it, wherever that clone is; `EPT_HW_SHARED` overrides.
A missing reference directory is an error, not a skip: these tests are the project's contract with
aihwkit's measurements.
"""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    candidates = [Path(os.environ["EPT_HW_SHARED"])] if os.environ.get("EPT_HW_SHARED") else []
    candidates += [_ROOT.parent / "shared", _ROOT / "shared", Path("/work/shared")]
    for path in candidates:
        if (path / "reference").is_dir():
            return path
    raise FileNotFoundError(
        "shared reference data not found (looked in " + ", ".join(str(c) for c in candidates)
        + "); set EPT_HW_SHARED to the folder that holds reference/"
    )


SHARED = _find_shared()
REFERENCE = SHARED / "reference"
