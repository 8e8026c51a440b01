from ditgraft.operators.registry import build_operator, get_spec, operator_flops, operator_names

__all__ = ["build_operator", "get_spec", "operator_flops", "operator_names"]
