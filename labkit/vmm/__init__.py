"""Everything above a backend: the run loop, buses, devices, isolation."""
