"""A fresh clone passes its own tests: the reference data is inside the repository and no code or
test names a path outside it."""

from __future__ import annotations

import re
from pathlib import Path

from _shared import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
# absolute machine paths, or a folder beside the checkout
OUTSIDE = re.compile(r"""(["'](/work|/home|/root|/tmp/[a-z])|\.\./shared|EPT_HW_SHARED)""")


def test_reference_data_is_part_of_the_repository():
    assert REFERENCE.resolve().is_relative_to(ROOT)
    files = sorted(p.relative_to(REFERENCE).as_posix() for p in REFERENCE.rglob("*.json"))
    assert "update_stats/constant_step_rank1.json" in files
    assert len([f for f in files if f.startswith("device_response/")]) >= 13
    assert "aihwkit 1.2.0" in (REFERENCE / "README.md").read_text()


def test_no_code_or_test_names_a_path_outside_the_repository():
    offenders = []
    for folder in ("ept_hw", "devices", "crossbar", "trainer", "experiments", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
