"""Analysis of a (grafted) model: attention locality and activation statistics per layer (``locality``), and the
plots of a result (``plots``). The locality layer selectors of ``ditgraft.layers`` read its analysis.json."""
