"""QueST policy modules: SkillVAE autoencoder, observation encoders, SkillGPT prior, policy."""

from ript.models.autoencoder import FSQ_LEVELS, SkillVAE, sinusoidal_table
from ript.models.encoders import ImageAugment, ObsEncoder, ResNetTrunk, SpatialSoftmax
from ript.models.policy import QuestPolicy, ReplanRecord
from ript.models.prior import SkillGPT

__all__ = [
    "FSQ_LEVELS",
    "ImageAugment",
    "ObsEncoder",
    "QuestPolicy",
    "ReplanRecord",
    "ResNetTrunk",
    "SkillGPT",
    "SkillVAE",
    "SpatialSoftmax",
    "sinusoidal_table",
]
