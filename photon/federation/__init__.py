"""Federated training: outer optimizers, streaming aggregation, server state, the round loop, Flower apps.

Only `server_app.py`, `client_app.py`, `messages.py` and `launch.py` import Flower; the rest is plain PyTorch.
"""
