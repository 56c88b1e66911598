"""The cluster wing (ARCHITECTURE.md ``etbench/cluster/``): tooling to run etbench on machines other than this one.

Today it holds :mod:`etbench.cluster.gpu_bundle`, the wheel bundle that lets the GPU check run on a bare CUDA image;
storage, pre-flight, admission and the Ray connection still live at the package's top level (architecture-2 G3).
This ``__init__`` imports nothing: ``gpu_bundle`` must import on a bare image before anything is installed.
"""
