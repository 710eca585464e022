"""Serving a vqdeploy export on existing servers: Ray Serve (batched) and NVIDIA Triton Inference Server.

`vqdeploy.serving.ray_serve` needs ``pip install vqdeploy[serve]``; `vqdeploy.serving.triton`
writes a Triton model repository with onnx alone (``vqdeploy[triton]`` adds the client whose
config schema the tests parse it with).
"""

from vqdeploy.serving.triton import write_triton_repository

__all__ = ["write_triton_repository"]
