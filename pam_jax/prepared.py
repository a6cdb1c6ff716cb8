"""Modules split and flattened once, for repeated calls into jitted functions.

Passing an NNX GraphDef as a static `jax.jit` argument makes every call hash it: about 10 ms
of Python for SAM 2 Hiera-L's graph and 15 ms for PAM-3B's, paid per image, per video frame and
per decode request (measured on the CI machine's CPU). Flattening an `nnx.State` is a
Python-level pytree walk (2-3 ms). `prepare` does both once: the structure (GraphDef + state
treedef) is a static argument whose hash is computed at construction, and the parameters travel
as a flat list of arrays, which JAX flattens in C++.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx


class Structure:
    """GraphDef + state treedef as one static jit argument whose hash is computed once."""

    def __init__(self, graphdef: Any, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Structure)
            and self._hash == other._hash
            and self.graphdef == other.graphdef
            and self.treedef == other.treedef
        )


@dataclasses.dataclass(frozen=True)
class Prepared:
    """`structure` goes to jit as a static argument, `leaves` as a traced one."""

    structure: Structure
    leaves: list


def prepare(module: nnx.Module) -> Prepared:
    """Split `module` once. The leaves are the live parameters at this moment: prepare again
    after replacing or updating them."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return Prepared(Structure(graphdef, treedef), leaves)


def merge(structure: Structure, leaves: list) -> Any:
    """Inverse of `prepare` (inside a jitted function: the module over traced leaves)."""
    return nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))
