"""Renderers of neuron dynamics and the kernel builder.

* :mod:`snncompile.codegen.render`: op tables for C and CUDA source and for PyTorch evaluation
  (targets differ by tables, not branches);
* :mod:`snncompile.codegen.torch_backend`: the eager reference (torch renderer);
* :mod:`snncompile.codegen.kernels`: CPU (OpenMP) and CUDA kernel sources from one step program;
* :mod:`snncompile.codegen.build`: system C compiler, ctypes loading, the on-disk cache;
* :mod:`snncompile.codegen.cpu` / :mod:`snncompile.codegen.cuda`: the loaded kernels;
* :mod:`snncompile.codegen.onnx_renderer`: the ONNX table (used by :mod:`snncompile.export`).

See ``docs/kernels.md``.
"""
