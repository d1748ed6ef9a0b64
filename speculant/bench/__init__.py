"""`speculant bench`: tasks (bench.tasks), peers (bench.peers), the grid and its report (bench.run),
plots (bench.plots). A leaf: it imports the core, the core never imports it."""
