"""MGD: channel matching (matching.py), the distiller (distiller.py), matching.json and heatmaps (report.py)."""
