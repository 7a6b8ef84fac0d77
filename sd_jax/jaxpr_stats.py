"""What a traced program holds, for keeping compile size in check.

XLA compiles every traced copy of a network separately (and on the CPU spends most of its
time generating code for each fused kernel), so a second copy of the UNet in the generation
program roughly doubles its compile time.  :func:`network_traces` counts the copies in a
jaxpr; ``tests/test_compile.py`` pins the counts of the generation program and
``benchmarks/bench_compile.py`` reports them with the compile times.
"""
from __future__ import annotations

import jax.extend as jex

# (primitive, name-stack suffix) that each network's trace contains exactly once: Flax names
# every module call's equations by its module path.
MARKERS = {"unet": ("dot_general", "UNet2DConditionModel/time_embedding/linear_1"),
           "text_encoder": ("add", "CLIPTextModel/text_model/embeddings"),
           "vae_decode": ("conv_general_dilated", "AutoencoderKL.decode/post_quant_conv")}


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(sub, (jex.core.ClosedJaxpr, jex.core.Jaxpr)):
                yield getattr(sub, "jaxpr", sub)


def network_traces(jaxpr) -> dict[str, int]:
    """How many times each network of :data:`MARKERS` was traced into ``jaxpr`` (a ``Jaxpr`` or
    ``ClosedJaxpr``).  Sub-jaxprs count once each, as XLA compiles them: a ``lax.scan`` body
    counts once however many steps it runs."""
    found = dict.fromkeys(MARKERS, 0)

    def walk(j):
        for e in j.eqns:
            for name, (prim, suffix) in MARKERS.items():
                if e.primitive.name == prim and str(e.source_info.name_stack).endswith(suffix):
                    found[name] += 1
            for sub in _subjaxprs(e):
                walk(sub)
    walk(getattr(jaxpr, "jaxpr", jaxpr))
    return found


def count_equations(jaxpr) -> int:
    """Equations of ``jaxpr``, those of its sub-jaxprs (scan, cond, jit bodies: once each) included."""
    j = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(1 + sum(count_equations(s) for s in _subjaxprs(e)) for e in j.eqns)
