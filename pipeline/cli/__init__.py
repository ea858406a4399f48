"""The ``ccnet`` command: sub-commands, job submission and scheduling."""
