"""The transformers minor releases strictly between the oldest and the newest that requirements.txt allows, each as
its newest patch release (CI tests the two ends in their own environments, and these in between)."""

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def allowed_transformers() -> Requirement:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("transformers"):
            return Requirement(line)
    raise SystemExit("requirements.txt names no transformers requirement")


def released_versions() -> list[Version]:
    """Every transformers release pip can install, from `pip index versions`."""
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], check=True,
                             capture_output=True, text=True).stdout
    available = re.search(r"Available versions: (.*)", listing).group(1)
    return [Version(text) for text in available.split(", ")]


def minors_between() -> list[str]:
    allowed = sorted(v for v in released_versions() if allowed_transformers().specifier.contains(v))
    newest_patch = {v.release[:2]: v for v in allowed}  # sorted, so each minor ends at its newest patch
    ends = {allowed[0].release[:2], allowed[-1].release[:2]}
    return [str(version) for minor, version in sorted(newest_patch.items()) if minor not in ends]


if __name__ == "__main__":
    if sys.argv[1:] != ["--between"]:
        raise SystemExit(__doc__)
    print(" ".join(minors_between()))
