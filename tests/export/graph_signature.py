"""The eval graph of an export, as data: what `test_options_off_graph` compares.

`signature` lists every node (op type, domain, inputs, outputs, attributes) of the main graph and
of its functions, the initializers (name, shape, dtype) and the graph's inputs and outputs; node
names (which count up) are left out. `CASES` are the modules whose signatures
`tests/export/data/eval_graphs.json` records as the seed's code exported them, before the
training options of vector-quantize-pytorch 1.32 were added.
"""

from __future__ import annotations

import onnx
import torch

import vqdeploy


def _attribute(attr: onnx.AttributeProto) -> str:
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, onnx.TensorProto):
        return f"tensor{list(value.dims)}:{onnx.numpy_helper.to_array(value).tolist()}"
    if isinstance(value, bytes):
        return value.decode()
    return repr(value)


def _nodes(nodes) -> list[list]:
    return [[n.op_type, n.domain, list(n.input), list(n.output), sorted(f"{a.name}={_attribute(a)}" for a in n.attribute)]
            for n in nodes]


def signature(proto: onnx.ModelProto) -> dict:
    graph = proto.graph
    return dict(
        inputs=[str(i.type).replace("\n", " ") for i in graph.input],
        outputs=[str(o.type).replace("\n", " ") for o in graph.output],
        nodes=_nodes(graph.node),
        initializers=sorted([i.name, list(i.dims), i.data_type] for i in graph.initializer),
        functions={f"{f.domain}.{f.name}": _nodes(f.node) for f in proto.functions},
    )


def cases() -> dict:
    """name -> a module in eval mode (seeded), built with arguments the seed's code already took."""
    from vqdeploy.compat import vector_quantize_pytorch as compat

    torch.manual_seed(0)
    built = {
        "vq": vqdeploy.VectorQuantize(dim=16, codebook_size=32),
        "vq_heads_cosine_projection": vqdeploy.VectorQuantize(dim=16, codebook_size=32, heads=2, codebook_dim=4,
                                                              separate_codebook_per_head=True, use_cosine_sim=True),
        "vq_image": vqdeploy.VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True),
        "vq_channel_first": vqdeploy.VectorQuantize(dim=8, codebook_size=16, channel_last=False),
        "rvq": vqdeploy.ResidualVQ(dim=16, num_quantizers=3, codebook_size=32),
        "rvq_shared_projection": vqdeploy.ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, codebook_dim=8,
                                                     shared_codebook=True),
        "compat_vq": compat.VectorQuantize(dim=16, codebook_size=32, layernorm_after_project_in=True, codebook_dim=8),
        "compat_rvq": compat.ResidualVQ(dim=16, num_quantizers=2, codebook_size=32),
    }
    return {name: module.eval() for name, module in built.items()}


PARTS = ("quantize", "encode", "decode")
