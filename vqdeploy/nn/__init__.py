"""Trainable quantizers with the API of vector-quantize-pytorch."""

from vqdeploy.nn.checkpoint import load_quantizer, save_quantizer
from vqdeploy.nn.factorized_vq import FactorizedResidualVQ
from vqdeploy.nn.grouped_residual_vq import GroupedResidualVQ
from vqdeploy.nn.options import TrainingOptions
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.nn.split_vq import SplitResidualVQ
from vqdeploy.nn.vector_quantize import VectorQuantize

__all__ = [
    "FactorizedResidualVQ", "GroupedResidualVQ", "ResidualVQ", "SplitResidualVQ", "TrainingOptions", "VectorQuantize",
    "load_quantizer", "save_quantizer",
]
