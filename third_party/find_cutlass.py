"""Locate the CUTLASS/CuTe headers that flash_attn2's kernels include.

CUTLASS is header-only for us. Two sources, in this order:
  1. $CUTLASS_DIR: a CUTLASS checkout (the folder that holds include/ and tools/).
  2. The `nvidia-cutlass` pip package (pinned: PIP_REQUIREMENT), which ships the same headers under
     cutlass_library/source/. It is located with importlib.util.find_spec, without importing it,
     so its Python dependencies (cuda-python, scipy, ...) need not be installed.

Run as a script it prints the include folders, one per line (and what it found on stderr).
"""

import importlib.metadata
import importlib.util
import os
import re
import sys

PIP_REQUIREMENT = "nvidia-cutlass==4.2.0.0"
PINNED_VERSION = "4.2.0"

_MARKER = os.path.join("cute", "tensor.hpp")
_VERSION_HEADER = os.path.join("cutlass", "version.h")


def _dirs_under(root):
    """include/ (required) and tools/util/include/ (when present) under a CUTLASS source root."""
    include = os.path.join(root, "include")
    if not os.path.isfile(os.path.join(include, _MARKER)):
        return None
    util = os.path.join(root, "tools", "util", "include")
    return [include] + ([util] if os.path.isdir(util) else [])


def cutlass_version(include_dir):
    """'MAJOR.MINOR.PATCH' read from cutlass/version.h, or None."""
    try:
        with open(os.path.join(include_dir, _VERSION_HEADER)) as header:
            text = header.read()
    except OSError:
        return None
    parts = [re.search(rf"#define CUTLASS_{name}\s+(\d+)", text) for name in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(part.group(1) for part in parts) if all(parts) else None


def cutlass_include_dirs():
    """Include folders for CUTLASS and CuTe. Raises RuntimeError with a fix when none are found."""
    if os.environ.get("CUTLASS_DIR"):
        root = os.path.abspath(os.path.expanduser(os.environ["CUTLASS_DIR"]))
        dirs = _dirs_under(root)
        if dirs is None:
            raise RuntimeError(
                f"flash_attn2: CUTLASS_DIR={root} has no include/{_MARKER}. Point CUTLASS_DIR at a "
                f"CUTLASS checkout (the folder holding include/ and tools/), or unset it to use the "
                f"pip package ({PIP_REQUIREMENT})."
            )
        return dirs
    spec = importlib.util.find_spec("cutlass_library")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for package_dir in locations:
        dirs = _dirs_under(os.path.join(package_dir, "source"))
        if dirs:
            return dirs
    raise RuntimeError(
        f"flash_attn2: CUTLASS headers not found. Run `pip install {PIP_REQUIREMENT}` "
        f"(`--no-deps` is enough: only its headers are used), or set CUTLASS_DIR to a CUTLASS checkout."
    )


def describe(dirs):
    """One line naming the CUTLASS version and where it came from; warns when it is not the pin."""
    version = cutlass_version(dirs[0])
    line = f"CUTLASS {version or '(unknown version)'}: {dirs[0]}"
    if not os.environ.get("CUTLASS_DIR"):
        try:
            line += f" (pip {importlib.metadata.version('nvidia-cutlass')})"
        except importlib.metadata.PackageNotFoundError:
            pass
    if version != PINNED_VERSION:
        line += f"; WARNING: flash_attn2 is tested against {PINNED_VERSION}"
    return line


if __name__ == "__main__":
    try:
        found = cutlass_include_dirs()
    except RuntimeError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    print(describe(found), file=sys.stderr)
    print("\n".join(found))
