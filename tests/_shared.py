"""Where the tests' reference data lives: `tests/reference/`, part of the repository.

The data was measured with IBM aihwkit 1.2.0 (see `tests/reference/README.md`: what, how, and how
the tests compare against it). A fresh clone needs nothing beside it. A missing reference
directory is an error, not a skip: these tests are the project's contract with aihwkit's
measurements.
"""

from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "reference"

if not (REFERENCE / "README.md").is_file():
    raise FileNotFoundError(f"the tests' reference data is missing: {REFERENCE} (it is part of the repository)")
