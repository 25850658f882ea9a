"""How tasks reach nodes and replies come back: in-process, on a virtual clock, or through Flower (records,
the blob side channel, the ServerApp and ClientApp)."""
