"""Training on one site: the LR schedule, the local trainer, multi-process clients, devices, evaluation,
memory sizing and the centralized baseline."""
