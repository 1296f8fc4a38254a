"""How the scripts under benchmarks/ find flash_attn2: the installed package, else this checkout's."""

import os
import sys


def import_flash_attn2():
    """The installed flash_attn2, else the one in this checkout (after `setup.py build_ext --inplace`)."""
    try:
        import flash_attn2
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import flash_attn2
    return flash_attn2
