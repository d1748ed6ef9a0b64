"""`speculant bench`: tasks (bench.tasks), the grid of methods (bench.plan), the runner and its
command line (bench.run), peers (bench.peers), memory (bench.memory), cells and speed-ups
(bench.stats), the table and JSON line (bench.report), plots (bench.plots). A leaf: it imports the
core, the core never imports it."""
