"""Tensor and pipeline parallelism over torch.distributed: the ranks' groups and collectives
(parallel.py), starting and stopping them (group.py), rank 0's side of each step (driver.py),
the messages (messages.py) and the workers' loop (worker.py)."""
