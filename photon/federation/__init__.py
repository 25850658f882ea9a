"""Federated training: outer optimizers, streaming aggregation, server state, the round loop, Flower apps.

Only `server_app.py`, `client_app.py`, `records.py`, `launch.py`, `deploy.py` and `warm_node.py` import Flower;
the rest is plain PyTorch.
"""
