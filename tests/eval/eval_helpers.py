"""Constants shared by the evaluation tests and their fixtures."""

from unimed.models.config import ModelConfig

IMAGE_SIZE = 64
TINY_MODEL = ModelConfig(
    image_encoder="resnet10t", frozen_text_layers=0, embed_dim=16, ctr_dim=16,
    projector_hidden_dim=32,
)
