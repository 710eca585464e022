"""A new option that is off changes nothing: the exported eval graph is the seed's, node for node.

`data/eval_graphs.json` holds the graphs (`graph_signature.signature`) that the code before the
1.32 training options (`TrainingOptions`, masks, top-k, affine_param, accept_3d_fmap,
GroupedResidualVQ) exported for `graph_signature.cases()`; the same modules built now export the
same graphs. Options that act only in training leave the eval graph alone even when on.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from graph_signature import PARTS, cases, signature

import vqdeploy
from vqdeploy.nn.options import TrainingOptions

GOLDEN = json.loads((Path(__file__).parent / "data" / "eval_graphs.json").read_text())


def _graph(module, tmp_path: Path, part: str) -> dict:
    path = vqdeploy.export_onnx(module.eval(), tmp_path / f"{part}.onnx", part=part, overwrite=True)
    return json.loads(json.dumps(signature(onnx.load(str(path)))))  # tuples -> lists, as the golden file


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cases()))
def test_seed_modules_export_the_graphs_they_exported_before(name, tmp_path):
    module = cases()[name]
    for part in PARTS:
        assert _graph(module, tmp_path, part) == GOLDEN[f"{name}/{part}"], f"{name}/{part}"


TRAINING_ONLY = {
    "stochastic_sample_codes": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "straight_through": dict(straight_through=True),
    "commitment_use_cross_entropy_loss": dict(commitment_use_cross_entropy_loss=True),
    "orthogonal_reg_weight": dict(orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True),
    "codebook_diversity_loss_weight": dict(codebook_diversity_loss_weight=0.1),
    "manual_ema_update": dict(manual_ema_update=True),
    "route_gradients_to_input": dict(route_gradients_to_input=False),
    "return_zeros_for_masked_padding": dict(return_zeros_for_masked_padding=False),
    "learnable_codebook": dict(learnable_codebook=True, sync_update_v=0.5),
}


@pytest.mark.parametrize("case", TRAINING_ONLY)
def test_training_only_options_leave_the_eval_graph_alone(case, tmp_path):
    torch.manual_seed(0)
    ema_update = not TRAINING_ONLY[case].get("learnable_codebook", False)
    module = vqdeploy.VectorQuantize(dim=16, codebook_size=32, ema_update=ema_update, **TRAINING_ONLY[case])
    for part in PARTS:
        assert _graph(module, tmp_path, part) == GOLDEN[f"vq/{part}"], part


def test_options_given_at_their_defaults_are_the_seed(tmp_path):
    torch.manual_seed(0)
    module = vqdeploy.VectorQuantize(dim=16, codebook_size=32, training_options=TrainingOptions(), accept_3d_fmap=False,
                                     affine_param=False, orthogonal_reg_weight=0.0)
    assert module.config == cases()["vq"].config
    assert _graph(module, tmp_path, "quantize") == GOLDEN["vq/quantize"]
    rvq = vqdeploy.ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, quant_grad_frac=0.0,
                              implicit_neural_codebook=False)
    assert rvq.config == cases()["rvq"].config
    assert _graph(rvq, tmp_path, "quantize") == GOLDEN["rvq/quantize"]
