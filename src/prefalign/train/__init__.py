"""Training: the method registry (methods.py), the one loop (loop.py), the offline and RL updates."""
