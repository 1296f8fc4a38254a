"""FlashAttention-2 for PyTorch: CUDA kernels behind flash-attn 2.x's Python API.

``import flash_attn2`` works without the compiled extension (``flash_attn2._C``): CPU tensors then
run the plain-PyTorch path, and CUDA tensors raise an error that says how to build it.
"""

from flash_attn2 import bert_padding, reference
from flash_attn2._ops import built_kernels, extension_available
from flash_attn2.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flash_attn2.kvcache import flash_attn_with_kvcache, merge_attention

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "bert_padding",
    "built_kernels",
    "extension_available",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "merge_attention",
    "reference",
]
