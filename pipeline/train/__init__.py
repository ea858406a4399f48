"""Training: the loop, its sessions, the Ray Train glue, the run driver and the Tune searches."""
