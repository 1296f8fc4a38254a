"""Locate the CUDA toolkit that compiles flash_attn2's kernels.

torch.utils.cpp_extension reads CUDA_HOME once, when it is imported; when CUDA_HOME is unset it takes
the folder above the `bin/` of the first `nvcc` on PATH. That guess is wrong when `nvcc` is a wrapper
script (a shim in /usr/local/bin that execs the real compiler, say): the guessed folder has no
include/cuda_runtime_api.h and every .cu file fails. `find_cuda_home()` returns a folder that holds
both the compiler and the runtime headers, so setup.py can set CUDA_HOME before torch reads it.

Run as a script it prints that folder on stdout (and how it was found on stderr), or explains on stderr
and exits 1. `.ci/run` and `benchmarks/run_on_device.sh` use it that way. No torch import here.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

RUNTIME_HEADER = os.path.join("include", "cuda_runtime_api.h")
NVCC_QUERY_TIMEOUT_S = 60

# Conventional install folders, tried last. Versioned folders are ordered newest first.
CONVENTIONAL_ROOTS = ("/usr/local/cuda", "/opt/cuda")
VERSIONED_ROOTS_GLOB = "/usr/local/cuda-*"


def is_toolkit(root):
    """True when `root` holds the runtime headers and the compiler."""
    return bool(root) and os.path.isfile(os.path.join(root, RUNTIME_HEADER)) and os.access(
        os.path.join(root, "bin", "nvcc"), os.X_OK
    )


def _root_reported_by_nvcc(nvcc):
    """Ask `nvcc` where it lives. `--dryrun` prints `#$ _HERE_=<its bin folder>`; this sees through
    wrapper scripts, which realpath() cannot."""
    cmd = [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", done.stderr + done.stdout, re.MULTILINE)
    return os.path.dirname(os.path.normpath(match.group(1).strip())) if match else None


def _version_key(path):
    return [int(part) for part in re.findall(r"\d+", os.path.basename(path))]


def _candidates():
    """(folder, where it came from), most explicit first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"the nvcc on PATH ({nvcc})"
        reported = _root_reported_by_nvcc(nvcc)
        if reported:
            yield reported, f"`{nvcc} --dryrun`"
    for root in CONVENTIONAL_ROOTS:
        yield root, "a conventional install folder"
    for root in sorted(glob.glob(VERSIONED_ROOTS_GLOB), key=_version_key, reverse=True):
        yield root, "a versioned install folder"


def find_cuda_home_verbose():
    """Return (toolkit root, explanation lines). Raises RuntimeError saying what was tried."""
    notes, tried = [], []
    for root, origin in _candidates():
        root = os.path.abspath(os.path.expanduser(root))
        if is_toolkit(root):
            notes.append(f"CUDA toolkit: {root} (from {origin})")
            return root, notes
        tried.append(f"  {root} (from {origin})")
        if origin.startswith("$"):
            notes.append(f"ignoring {origin[1:]}={root}: it has no {RUNTIME_HEADER} or bin/nvcc")
    raise RuntimeError(
        "flash_attn2: no CUDA toolkit found. Set CUDA_HOME to the toolkit root whose include/ has "
        "cuda_runtime_api.h (and whose bin/ has nvcc). Tried:\n" + ("\n".join(tried) or "  nothing")
    )


def find_cuda_home():
    """The root of a usable CUDA toolkit (see the module docstring)."""
    return find_cuda_home_verbose()[0]


if __name__ == "__main__":
    try:
        found, explanation = find_cuda_home_verbose()
    except RuntimeError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    for line in explanation:
        print(line, file=sys.stderr)
    print(found)
