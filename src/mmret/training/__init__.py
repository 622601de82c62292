"""Training the small heads on frozen, cached backbone features."""
