"""`featkd bench`: protocols, the resumable grid of runs, validation tuning, statistics, tables, step timing."""
