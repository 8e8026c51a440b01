"""The slot vocabulary every model family maps onto: ``attn`` (token mixer) and ``mlp`` (channel mixer)."""
from __future__ import annotations

SLOTS = ("attn", "mlp")
