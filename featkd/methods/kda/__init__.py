"""KDA: the distiller (distiller.py); kernels, landmark strategies and k-means (landmarks.py)."""
