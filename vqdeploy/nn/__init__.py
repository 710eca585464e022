"""Trainable quantizers with the API of vector-quantize-pytorch."""

from vqdeploy.nn.checkpoint import load_quantizer, save_quantizer
from vqdeploy.nn.residual_vq import ResidualVQ
from vqdeploy.nn.vector_quantize import VectorQuantize

__all__ = ["ResidualVQ", "VectorQuantize", "load_quantizer", "save_quantizer"]
