"""Constants shared by the evaluation tests and their fixtures."""

from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)

IMAGE_SIZE = 64
TINY_MODEL = MedUniCConfig(
    image=ImageTowerConfig(encoder="resnet10t"), text=TextTowerConfig(frozen_layers=0),
    projector=MedUniCProjectorConfig(embed_dim=16, ctr_dim=16, hidden_dim=32),
)
