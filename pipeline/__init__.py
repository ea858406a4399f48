"""The CCNet pipeline: data, storage, training, evaluation, tuning and tracking around ``ccnet``."""
