"""Encoders turn images and texts into vectors in one space; pick one by spec string.

=================================  ====================================================
spec                               encoder
=================================  ====================================================
``starter-v4``                     the offline default: ``starter-v2`` and ``starter-v3``
                                   averaged (an ensemble, weights chosen on Flickr8k dev)
``starter-v3``                     EfficientNet-Lite1 + all-mpnet-base-v2, aligned
``starter-v2``                     EfficientNet-Lite0 + MiniLM, aligned with ImageNet
                                   distillation
``starter``                        EfficientNet-Lite0 + MiniLM, aligned (the first default)
``starter:DIR``                    an alignment trained into DIR, on the towers it names
``ensemble:DIR``                   single-vector models averaged with the weights
                                   ``mmret train ensemble`` chose, saved in DIR
``hf:NAME_OR_DIR``                 a Hugging Face CLIP or SigLIP model
``open_clip:MODEL/PRETRAINED``     an open_clip model (``open_clip:MODEL`` for random init,
                                   ``open_clip:MODEL/path/to/checkpoint.pt`` for a file)
``hat``                            HAT: hierarchical alignment of several layers of the
                                   starter towers (``hat:DIR`` for one trained into DIR)
``ret``                            ReT: latent tokens fused from several layers of both
                                   starter towers, scored by MaxSim (``ret:DIR``)
``hash:DIM``                       weightless and deterministic, for tests (not aligned)
``hash-tokens:TxD``                its multi-vector twin: T tokens of D dimensions
=================================  ====================================================
"""

from __future__ import annotations

from mmret.encoders import ensemble, hashing, hat, hf_clip, open_clip_backend, ret, starter
from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS, load_encoder
from mmret.encoders.starter import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "ENCODERS", "Encoder", "load_encoder"]

_LOADED = (
    ensemble,
    hashing,
    hat,
    hf_clip,
    open_clip_backend,
    ret,
    starter,
)  # imported for their registrations
