"""A deterministic fault simulator for the control plane (see run.py, sim.py)."""
