"""Design-space exploration: sweeps over recipe fields (``sweep``), their table and plots (``table``), and the
search for an operator per layer under a cost budget (``search``)."""
