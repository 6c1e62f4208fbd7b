"""How a run spreads over processes and devices: ranks, process groups, the DDP / FSDP2 / HSDP layout
(dist.py) and the numeric precision of a step (precision.py). Knows nothing of the model's insides."""
