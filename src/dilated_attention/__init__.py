"""Exact dilated attention (LongNet) for very long sequences, on one device or a ring of them."""

from .decoding import DilatedKVCache
from .functional import dilated_attention
from .modules import DilatedAttention, MultiheadDilatedAttention
from .pattern_cache import PatternCache, clear_global_pattern_cache, get_global_pattern_cache
from .model import LongNetDecoderLayer, LongNetLM
from .mesh import RingDistributedDilatedAttention, RingDistributedMultiheadDilatedAttention
from .ring import RingDilatedAttention, RingMultiheadDilatedAttention

__all__ = [
    "dilated_attention",
    "DilatedAttention",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "RingDistributedDilatedAttention",
    "RingDistributedMultiheadDilatedAttention",
    "DilatedKVCache",
    "LongNetLM",
    "LongNetDecoderLayer",
    "PatternCache",
    "get_global_pattern_cache",
    "clear_global_pattern_cache",
]
__version__ = "0.1.0"
