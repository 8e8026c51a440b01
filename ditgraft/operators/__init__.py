"""Operators by name. Importing this package imports every operator family, which registers its classes; adding a
family is one new module plus one import line here."""
from ditgraft.operators import (attention, hyena, linear_attention, local_attention, mamba2, mlp,  # noqa: F401
                                rope_attention)
from ditgraft.operators.registry import build_operator, get_spec, operator_flops, operator_names

__all__ = ["build_operator", "get_spec", "operator_flops", "operator_names"]
