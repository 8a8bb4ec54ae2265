"""Print pip constraints that pin every dependency in setup.cfg's install_requires to its floor.

    python3 .ci/floors.py [setup.cfg] > floors.txt    # then: pip install -c floors.txt -e .

setup.cfg stays the one source of truth: each `name>=X` line becomes `name==X`. A dependency
without a `>=` floor is an error naming it, since the floors job could not prove anything about it.
Written by hand rather than with `packaging` because this runs before any venv exists (system python).
"""
from __future__ import annotations

import configparser
import re
import sys

FLOOR = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(?:,\s*<[^;]*)?$")


def floors(setup_cfg: str) -> list[str]:
    """setup.cfg's install_requires -> ['name==floor', ...]; raises SystemExit naming a line without a floor."""
    config = configparser.ConfigParser()
    if not config.read(setup_cfg):
        raise SystemExit(f"{setup_cfg}: not found")
    lines = [line.split("#")[0].strip() for line in config["options"]["install_requires"].splitlines()]
    pins = []
    for line in filter(None, lines):
        match = FLOOR.match(line)
        if match is None:
            raise SystemExit(f"{setup_cfg}: install_requires line {line!r} has no '>=' floor for the floors job to pin")
        pins.append(f"{match.group(1)}=={match.group(3)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg")))
