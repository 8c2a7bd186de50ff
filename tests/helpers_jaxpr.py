"""Walking a traced program: the element count of every intermediate, loop and checkpoint bodies included
(for tests that some tensor size never exists)."""

import numpy as np
from jax.extend import core as jex_core


def intermediate_sizes(jaxpr) -> list[int]:
    """Element counts of every equation output of `jaxpr` (a Jaxpr) and of the sub-jaxprs in its params
    (scan / while / cond / checkpoint / custom_vjp bodies)."""
    out = []
    for eqn in jaxpr.eqns:
        out += [int(np.prod(getattr(var.aval, "shape", ()))) for var in eqn.outvars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex_core.Jaxpr):
                    out += intermediate_sizes(sub)
    return out
