"""DFA: the distiller (distiller.py) and the bridge-loss search of the aggregation weights (search.py)."""
