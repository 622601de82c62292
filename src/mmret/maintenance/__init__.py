"""Keeping an index folder sound: check, repair (re-encoding what is lost) and re-clustering.

Above the encoders and the index layer: repairing token features re-encodes items.
"""
