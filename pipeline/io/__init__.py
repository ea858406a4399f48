"""Where runs and data live: object storage, locations, secrets kept out of text, checkpoints, run leases."""
