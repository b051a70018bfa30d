"""snncompile.runtime (filled by later work).

Chunked execution and streaming (:mod:`snncompile.runtime.chunked`) are re-exported here:
``snncompile.runtime.stream(module, chunks, reduce=...)`` and
``snncompile.runtime.chunked_forward(module, x_seq, chunk_size)``.
"""

from snncompile.runtime.chunked import ChunkedModule, chunked_forward, stream

__all__ = ["ChunkedModule", "chunked_forward", "stream"]
