"""RECO: refine embeddings at inference time with a memory of image-text pairs."""
