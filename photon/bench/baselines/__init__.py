"""Baselines the benchmarks measure Photon against: data-parallel training (DDP) and the torchft peer."""
