"""Tokens of a whole exported model (encoder + quantizer) in ONNX Runtime against the eager model,
with differing tokens judged on the eager encoder's rows (used by `vqdeploy demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vqdeploy.parity.classify import classify_tokens


def whole_model_tokens(model, images, onnx_path: Path) -> tuple[dict[str, int], Any, Any]:
    """Run the whole-model file on `images` and classify its tokens against the eager model's.

    `model` has `.features(x)` (the encoder), `.quantizer` (a VectorQuantize) and returns
    (reconstruction, indices). Returns the counts, the session and its reconstruction.
    """
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: images.numpy()}
    reconstruction, indices = session.run(None, feed)
    with torch.inference_mode():
        features = model.features(images)
        _, eager_indices = model(images)
    got, want = torch.from_numpy(np.asarray(indices)).reshape(-1), eager_indices.reshape(-1)
    rows = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]).float()
    stage = classify_tokens(rows, model.quantizer.codebook.detach(), want, got)
    counts = {"tokens": stage.tokens, "identical": stage.identical, "ties": stage.certified_ties,
              "violations": stage.violations}
    return counts, session, reconstruction
