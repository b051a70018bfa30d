"""snncompile.runtime (filled by later work).

Chunked execution and streaming (:mod:`snncompile.runtime.chunked`) are re-exported here:
``snncompile.runtime.stream(module, chunks, reduce=...)`` and
``snncompile.runtime.chunked_forward(module, x_seq, chunk_size)``.
``snncompile.runtime.reuse_host_memory()`` (:mod:`snncompile.runtime.host_memory`) keeps the
large blocks a training step frees for the next step instead of faulting them in again.
"""

from snncompile.runtime.chunked import ChunkedModule, chunked_forward, stream
from snncompile.runtime.host_memory import reuse_host_memory

__all__ = ["ChunkedModule", "chunked_forward", "reuse_host_memory", "stream"]
