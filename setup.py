"""Build flash_attn2._C: the CUTLASS/CuTe kernels and their torch bindings.

    pip install --no-build-isolation .          # or: python setup.py build_ext --inplace

Build variables (all optional):
    FLASH_ATTN2_ARCHS          SM versions, "80;90" (default) or "80,90" or "90a"; 80 at least.
    FLASH_ATTN2_HEAD_DIMS      build only these head-dim kernels, e.g. "64,128" (default: all).
    FLASH_ATTN2_DTYPES         build only these dtypes, e.g. "bf16" (default: fp16,bf16).
    FLASH_ATTN2_MASKS          build only these masks, e.g. "none,causal" (default: none,causal,local).
    FLASH_ATTN2_MODIFIERS      modifier families of "plain,softcap,alibi,mod" (default: all); "mod" (softcap,
                               ALiBi, dropout in any combination) also serves softcap and ALiBi calls.
    FLASH_ATTN2_PTXAS_VERBOSE  "1": ptxas reports registers, shared memory and spills per kernel.
    FLASH_ATTN2_KVCACHE_EVICT_FIRST  "1": the KV-cache kernels load K and V with an L2 evict-first policy
                               (an A/B switch, not yet measured: benchmarks/PERF_LOG.md).
    MAX_JOBS                   compiler processes run at once (read by torch's ninja build).
    CUDA_HOME                  CUDA toolkit root; found automatically (third_party/find_cuda.py).
    CUTLASS_DIR                a CUTLASS checkout; default: the nvidia-cutlass pip package
                               (third_party/find_cutlass.py).

What is built is defined once, in csrc/generate_instantiations.py; this file only asks it.
"""

import glob
import importlib.util
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC_DIR = "csrc"
INSTANTIATIONS_DIR = os.path.join(CSRC_DIR, "instantiations")
GENERATOR = os.path.join(CSRC_DIR, "generate_instantiations.py")
HAND_WRITTEN_SOURCES = ("bindings.cpp", os.path.join("api", "*.cpp"), os.path.join("launch", "*.cpp"),
                        os.path.join("launch", "*.cu"))

DEFAULT_ARCHS = "80;90"
# cp.async, ldmatrix and bf16 mma.sync, which the kernels are built from, start with Ampere (sm_80).
MIN_ARCH = 80

CXX_FLAGS = ["-O3", "-std=c++20", "-DNDEBUG"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-lineinfo",
    # torch defines these to keep its own half/bfloat16 types apart from CUDA's; the kernels use
    # CUDA's operators and conversions, so take the definitions back (they come after torch's).
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "-DNDEBUG",
]


def load_module(name, path):
    """Import a file by path (not on sys.path). Registered in sys.modules so dataclasses work."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_archs(text):
    """'80;90' / '80,90' / '8.0 sm_90a' -> ['80', '90'] / ['80', '90a']; refuses anything before sm_80."""
    archs = []
    for token in filter(None, re.split(r"[;,\s]+", text)):
        match = re.fullmatch(r"(?:sm_?)?(\d{2,3})([af]?)", token.lower().replace(".", ""))
        if match is None:
            raise SystemExit(
                f"flash_attn2: FLASH_ATTN2_ARCHS={text!r}: {token!r} is not an SM version "
                f"(write e.g. '80;90', '80,90' or '90a')."
            )
        if int(match.group(1)) < MIN_ARCH:
            raise SystemExit(
                f"flash_attn2: FLASH_ATTN2_ARCHS={text!r}: sm_{match.group(1)} is not supported. The "
                f"kernels need cp.async, ldmatrix and bf16 mma.sync, so sm_{MIN_ARCH} (Ampere) or newer: "
                f"e.g. 80, 86, 89, 90, 90a."
            )
        arch = match.group(1) + match.group(2)
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit(f"flash_attn2: FLASH_ATTN2_ARCHS={text!r} names no SM version.")
    return archs


def gencode_flags(archs):
    """Machine code (no PTX) for each arch."""
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]


def set_cuda_home():
    """Point CUDA_HOME at a real toolkit. Must run before torch.utils.cpp_extension is imported:
    torch reads CUDA_HOME once, at import, and otherwise guesses from the nvcc on PATH."""
    find_cuda = load_module("flash_attn2_find_cuda", os.path.join(ROOT, "third_party", "find_cuda.py"))
    try:
        cuda_home, notes = find_cuda.find_cuda_home_verbose()
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    for note in notes:
        print(f"flash_attn2: {note}")
    os.environ["CUDA_HOME"] = cuda_home
    return cuda_home


def cutlass_include_dirs():
    find_cutlass = load_module("flash_attn2_find_cutlass", os.path.join(ROOT, "third_party", "find_cutlass.py"))
    try:
        dirs = find_cutlass.cutlass_include_dirs()
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    print(f"flash_attn2: {find_cutlass.describe(dirs)}")
    return dirs


def generate_kernel_sources():
    """Ask the generator what to build (FLASH_ATTN2_HEAD_DIMS / _DTYPES) and write those .cu files.
    Unchanged files are not rewritten, so ninja does not rebuild them."""
    if not os.path.isfile(GENERATOR):
        raise SystemExit(f"flash_attn2: {GENERATOR} is missing; it defines which kernels are built.")
    generator = load_module("flash_attn2_generate_instantiations", os.path.abspath(GENERATOR))
    try:
        selection = generator.parse_env(os.environ)
    except ValueError as err:
        raise SystemExit(f"flash_attn2: {err}") from None
    instantiations = generator.select(**selection)
    os.makedirs(INSTANTIATIONS_DIR, exist_ok=True)
    cu_files = generator.write(INSTANTIATIONS_DIR, instantiations)
    if not cu_files:
        raise SystemExit(f"flash_attn2: the selection {selection} gives no kernels to build.")
    head_dims = ",".join(map(str, selection.get("head_dims") or [])) or "all"
    dtypes = ",".join(selection.get("dtypes") or []) or "all"
    masks = ",".join(selection.get("masks") or []) or "all"
    modifiers = ",".join(selection.get("modifiers") or []) or "all"
    print(f"flash_attn2: {len(cu_files)} kernel files (head dims {head_dims}; dtypes {dtypes}; masks {masks}; "
          f"modifiers {modifiers})")
    return [os.path.relpath(os.path.abspath(path), ROOT) for path in cu_files]


def hand_written_sources():
    sources = []
    for pattern in HAND_WRITTEN_SOURCES:
        sources += sorted(glob.glob(os.path.join(CSRC_DIR, pattern)))
    if not sources:
        raise SystemExit(f"flash_attn2: no C++ sources found under {CSRC_DIR}/.")
    return sources


def nvcc_flags(archs):
    flags = NVCC_FLAGS + gencode_flags(archs)
    if os.environ.get("FLASH_ATTN2_PTXAS_VERBOSE") == "1":
        flags.append("-Xptxas=-v")
    if os.environ.get("FLASH_ATTN2_KVCACHE_EVICT_FIRST") == "1":
        flags.append("-DFLASH_ATTN2_KVCACHE_EVICT_FIRST=1")
    return flags


def extension_and_cmdclass():
    cuda_home = set_cuda_home()
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise SystemExit(f"flash_attn2: torch {torch.__version__} is a CPU-only build; install a CUDA build.")
    # In case another module imported cpp_extension before us and it guessed otherwise.
    cpp_extension.CUDA_HOME = cuda_home

    archs = parse_archs(os.environ.get("FLASH_ATTN2_ARCHS") or DEFAULT_ARCHS)
    print(f"flash_attn2: building for sm_{', sm_'.join(archs)} with torch {torch.__version__}")
    extension = cpp_extension.CUDAExtension(
        name="flash_attn2._C",
        sources=hand_written_sources() + generate_kernel_sources(),
        include_dirs=[os.path.join(ROOT, CSRC_DIR), os.path.join(ROOT, CSRC_DIR, "include")] + cutlass_include_dirs(),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags(archs)},
    )
    return extension, {"build_ext": cpp_extension.BuildExtension}


# Relative source paths (as setuptools wants them) are relative to this folder.
os.chdir(ROOT)
_extension, _cmdclass = extension_and_cmdclass()
setup(ext_modules=[_extension], cmdclass=_cmdclass)
