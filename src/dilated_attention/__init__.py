"""Exact dilated attention (LongNet) for very long sequences, on one device or a ring of them."""

from .functional import dilated_attention
from .modules import DilatedAttention, MultiheadDilatedAttention
from .ring import RingDilatedAttention, RingMultiheadDilatedAttention

__all__ = [
    "dilated_attention",
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
]
__version__ = "0.1.0"
