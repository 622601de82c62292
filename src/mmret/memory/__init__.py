"""RECO: refine embeddings at inference time with a memory of image-text pairs.

>>> from mmret.memory import build_memory, load_refiner            # doctest: +SKIP
>>> build_memory("train.jsonl", "train.memory")                     # doctest: +SKIP
>>> refiner = load_refiner("train.memory")                          # doctest: +SKIP
>>> retriever = mmret.Retriever.create("photos.mmret", refiner=refiner)  # doctest: +SKIP
"""

from mmret.memory.refine import Refiner, RefinerOptions, load_refiner
from mmret.memory.store import Memory, build_memory

__all__ = ["Memory", "Refiner", "RefinerOptions", "build_memory", "load_refiner"]
