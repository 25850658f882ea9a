"""Training on one site: the LR schedule, the local trainer, evaluation and the centralized baseline."""
