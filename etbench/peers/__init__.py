"""Peer implementations of etbench computations in other frameworks, for side-by-side speed checks.

Each peer imports its framework lazily, so etbench works without the optional ``peers`` extra.
"""
