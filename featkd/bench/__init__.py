"""`featkd bench`: benchmark protocols run as resumable grids of ordinary training runs, and their results.

- :mod:`featkd.bench.protocol`: the protocol YAML format (rows, seeds, validation split, ``tune:`` grid) and loading it.
- :mod:`featkd.bench.runner`: the runs: a protocol's grid of cells, each a ``featkd train`` process; step timing.
- :mod:`featkd.bench.stats`: statistics over finished runs: one row per method, paired per-seed differences.
- :mod:`featkd.bench.report`: the results for people: the Markdown table and the plots.
- :mod:`featkd.bench.tune`: ``--tune``: trials on a tuning seed, selection on the validation split, report seeds.
- :mod:`featkd.bench.timing`: side-by-side step timing (interleaved rounds, medians, ratios).
"""
