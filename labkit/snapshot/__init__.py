"""Snapshots: a stopped VM's state in a checked, atomically written file (:mod:`labkit.snapshot.file`)."""
