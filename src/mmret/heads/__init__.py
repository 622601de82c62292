"""Small trainable modules on top of frozen backbone features."""
