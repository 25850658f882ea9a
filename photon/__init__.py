"""Photon: federated pre-training of decoder-only language models (Sani et al., MLSys 2025), on Flower."""

__version__ = "0.1.0"
