"""Giving freed memory back to the system between the stages of a long job."""

import ctypes
import gc


def return_freed_memory() -> None:
    """Collect garbage, then ask glibc to hand freed heap pages back to the system.

    glibc keeps most freed blocks mapped for reuse, and a stage's dense towers leave them fragmented, so without
    this the next stage's peak stacks on the last one's leftovers (measured on a ViT-B-16 build). A no-op where
    the C library is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
