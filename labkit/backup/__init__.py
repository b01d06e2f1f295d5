"""Backups, and why a snapshot is not one (notebook 09, "Backups").
"""
