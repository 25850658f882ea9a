"""Processes: the simulation, the SuperLink, SuperNodes, run submission, the warm node and certificates."""
