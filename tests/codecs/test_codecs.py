"""Each codec's real quantizer (random weights, small configs) against its vqdeploy conversion."""

import numpy as np
import pytest
import torch
from codec_models import codec_decode, codec_encode
from codec_parity import stage_tokens, tally

import vqdeploy
from vqdeploy.errors import NotConvertibleError, VQDeployError
from vqdeploy.nn import FactorizedResidualVQ, ResidualVQ, SplitResidualVQ

KINDS = {"encodec": ResidualVQ, "dac": FactorizedResidualVQ, "snac": FactorizedResidualVQ, "mimi": SplitResidualVQ}
INPUTS = ("latents", "sine sweeps", "noise", "near ties")


def _same_layout(name, ours, theirs):
    if name == "snac":
        assert isinstance(ours, tuple) and isinstance(theirs, tuple) and len(ours) == len(theirs)
        assert [t.shape for t in ours] == [t.shape for t in theirs]
    else:
        assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape


def _equal(ours, theirs) -> bool:
    if isinstance(ours, tuple):
        return all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    return torch.equal(ours, theirs)


def test_converts_in_one_call_to_its_kind(codec):
    assert type(codec.converted) is KINDS[codec.name]
    assert vqdeploy.convert(codec.converted) is codec.converted


@pytest.mark.parametrize("inputs", INPUTS)
def test_tokens_match_the_codecs_own_encode(codec, inputs):
    x = codec.inputs()[inputs]
    theirs = codec_encode(codec.name, codec.quantizer, x)
    ours = codec.converted.encode(x) if not isinstance(codec.converted, ResidualVQ) else codec.converted.eval_tokens(x)
    _same_layout(codec.name, ours, theirs)
    own = tally(codec.converted, x, ours)
    assert own.ok and own.identical == own.tokens  # vqdeploy's CPU search is exact
    result = tally(codec.converted, x, theirs)  # the codec's float32 search: identical or certified ties
    assert result.ok, result
    if inputs != "near ties":  # away from ties, the codec's float32 argmin is the exact one
        assert _equal(ours, theirs)
    else:  # the probes reach their midpoints: some codec tokens differ from the exact ones, as ties
        assert result.tokens == sum(t.numel() for t in stage_tokens(codec.converted, theirs))
        assert result.certified_ties > 0


def test_the_token_check_catches_wrong_tokens(codec):
    x = codec.latents
    theirs = codec_encode(codec.name, codec.quantizer, x)
    size = codec.converted.codebook_size
    shifted = tuple((t + 1) % size for t in theirs) if isinstance(theirs, tuple) else (theirs + 1) % size
    assert tally(codec.converted, x, shifted).violations > 0


@pytest.mark.parametrize("n_q", [1, 2])
def test_stages_used_at_call_match_the_codec(codec, n_q):
    if codec.name == "snac":
        pytest.skip("SNAC always uses every stage (its forward has no number of stages)")
    x = codec.latents
    theirs = codec_encode(codec.name, codec.quantizer, x, n_q=n_q)
    with torch.no_grad():
        ours = codec.converted.eval()(x, n_q=n_q)[1]
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_decode_matches_the_codecs_decode(codec):
    x = codec.latents
    codes = codec_encode(codec.name, codec.quantizer, x)
    theirs = codec_decode(codec.name, codec.quantizer, codes)
    with torch.no_grad():
        ours = codec.converted.get_output_from_indices(codes)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_quantized_output_matches_the_codec_forward(codec):
    x = codec.latents
    with torch.no_grad():
        ours = codec.converted(x)[0]
        if codec.name in ("dac", "snac"):  # the codec's own forward, straight-through rounding included
            theirs = codec.quantizer(x)[0]
        else:
            theirs = codec_decode(codec.name, codec.quantizer, codec_encode(codec.name, codec.quantizer, x))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_weights_and_ema_state_are_kept(codec):
    q, c = codec.quantizer, codec.converted
    if codec.name == "encodec":
        for layer, stage in zip(q.layers, c.layers, strict=True):
            assert torch.equal(stage._codebook.embed[0], layer.codebook.embed)
            assert torch.equal(stage._codebook.embed_avg[0], layer.codebook.embed_avg)
            assert torch.equal(stage._codebook.cluster_size[0], layer.codebook.cluster_size)
    elif codec.name == "mimi":
        halves = (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer)
        layers = [layer for half in halves for layer in half.layers]
        for layer, stage in zip(layers, c.layers, strict=True):
            assert torch.equal(stage._codebook.embed_avg[0], layer.codebook.embed_sum)
            assert torch.equal(stage._codebook.cluster_size[0], layer.codebook.cluster_usage)
            assert torch.equal(stage.codebook, layer.codebook.embed)
    else:
        for theirs, ours in zip(q.quantizers, c.quantizers, strict=True):
            assert torch.equal(ours.codebook.weight, theirs.codebook.weight)
            assert torch.equal(ours.in_proj.weight, theirs.in_proj.weight)
            assert torch.equal(ours.out_proj.bias, theirs.out_proj.bias)
        assert c.strides == [getattr(s, "stride", 1) for s in q.quantizers]


@pytest.mark.slow
@pytest.mark.parametrize("part", ["quantize", "decode"])  # encode: test_export_bakes_in_the_stages_used, and quantize's indices
def test_fused_export_runs_on_onnxruntime_at_parity(codec, part, tmp_path):
    import onnx
    import onnxruntime as ort

    module = codec.converted
    path = vqdeploy.export_onnx(module, tmp_path / f"{codec.name}.onnx", part=part)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("NearestCode" in ops) == (part != "decode")
    info = vqdeploy.read_metadata(path)
    assert info.kind == type(module).__name__ and info.num_quantizers == module.num_quantizers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    x = torch.cat([codec.latents, codec.latents.flip(-1)], dim=-1)  # another length than the export's example
    with torch.no_grad():
        tokens = codec.converted.encode(x) if not isinstance(module, ResidualVQ) else module.eval_tokens(x)
    if part == "decode":
        feeds = tokens if isinstance(tokens, tuple) else (tokens,)
        (vectors,) = session.run(None, {n: t.numpy() for n, t in zip(names, feeds, strict=True)})
        with torch.no_grad():
            expected = module.get_output_from_indices(tokens)
        np.testing.assert_allclose(vectors, expected.numpy(), rtol=1e-5, atol=1e-5)
        return
    outputs = session.run(None, {"x": x.numpy()})
    served = [torch.from_numpy(o) for o in outputs[1:] if part == "quantize"] or [torch.from_numpy(o) for o in outputs]
    served = tuple(served) if codec.name == "snac" else served[0]
    result = tally(module, x, served)
    assert result.ok, result
    if part == "quantize":
        with torch.no_grad():
            if isinstance(module, FactorizedResidualVQ):  # the forward's output: straight-through rounding included
                assert _equal(served, tokens)
                expected = module(x)[0]
            else:
                expected = module.get_output_from_indices(served)
        np.testing.assert_allclose(outputs[0], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_encode_export_with_the_stages_used_baked_in(codec, tmp_path):
    import onnxruntime as ort

    module = codec.converted
    n_q = None if codec.name == "snac" else 2  # SNAC always uses every stage: its tuple, one output each
    path = vqdeploy.export_onnx(module, tmp_path / "nq.onnx", part="encode", n_q=n_q)
    assert vqdeploy.read_metadata(path).num_quantizers == (n_q or module.num_quantizers)
    outputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": codec.latents.numpy()})
    theirs = codec_encode(codec.name, codec.quantizer, codec.latents, n_q=n_q)
    served = tuple(torch.from_numpy(o) for o in outputs) if codec.name == "snac" else torch.from_numpy(outputs[0])
    _same_layout(codec.name, served, theirs)
    result = tally(module, codec.latents, served)  # ORT's float32 search: identical, or certified ties
    assert result.ok, result


def test_a_foreign_class_gets_a_typed_error_listing_what_converts():
    class MyQuantizer(torch.nn.Module):
        pass

    with pytest.raises(NotConvertibleError) as error:
        vqdeploy.convert(MyQuantizer())
    message = str(error.value)
    assert "MyQuantizer" in message and "transformers.MimiSplitResidualVectorQuantizer" in message
    assert "snac.ResidualVectorQuantize" in message and "encodec.ResidualVectorQuantizer" in message
    assert isinstance(error.value, VQDeployError) and isinstance(error.value, TypeError)
    with pytest.raises(NotConvertibleError):
        vqdeploy.convert("not a module")


@pytest.mark.slow
@pytest.mark.parametrize("part", ["quantize"])  # tokens and vectors; the other parts' files share its search and decode
def test_runtime_load_and_verify_pass_the_converted_encodec(part, tmp_path):
    from codec_cases import get_codec

    from vqdeploy import runtime

    codec = get_codec("encodec")
    module = codec.converted
    path = vqdeploy.export_onnx(module, tmp_path / "encodec.onnx", part=part)
    with runtime.load(path, backend="ort") as served, torch.no_grad():
        tokens = module.eval_tokens(codec.latents)
        if part == "encode":
            assert torch.equal(served.encode(codec.latents), tokens)
        elif part == "quantize":
            vectors, indices = served.quantize(codec.latents)
            assert torch.equal(indices, tokens) and torch.equal(vectors, module(codec.latents)[0])
        else:
            assert torch.equal(served.decode(tokens), module.get_output_from_indices(tokens))
    report = vqdeploy.verify(module, path, backend="ort", num_samples=512)
    assert report.passed and report.violations == 0, report.table()
    assert report.tokens > 0 or report.vectors.rows > 0


@pytest.mark.slow
@pytest.mark.parametrize("n_q", [2])  # the split RVQ with stages baked in (all stages: the EnCodec test's path)
def test_runtime_load_runs_the_converted_mimi(n_q, tmp_path):
    from codec_cases import get_codec

    from vqdeploy import runtime

    codec = get_codec("mimi")
    module = codec.converted
    for part in ("encode", "quantize"):
        path = vqdeploy.export_onnx(module, tmp_path / f"mimi_{part}.onnx", part=part, n_q=n_q)
        for backend in ("ort", "torch"):
            with runtime.load(path, backend=backend) as served, torch.no_grad():
                expected, tokens = module(codec.latents, n_q=n_q)[:2]
                if part == "encode":
                    assert torch.equal(served.encode(codec.latents), tokens)
                else:
                    vectors, indices = served.quantize(codec.latents)
                    assert torch.equal(indices, tokens)
                    torch.testing.assert_close(vectors, expected, rtol=1e-6, atol=1e-5)


def test_runtime_load_refuses_a_factorized_export_by_name(tmp_path):
    from vqdeploy import runtime
    from vqdeploy.errors import UnsupportedOptionError

    module = FactorizedResidualVQ(dim=16, num_quantizers=2, codebook_size=32).eval()
    path = vqdeploy.export_onnx(module, tmp_path / "f.onnx", part="encode")
    with pytest.raises(UnsupportedOptionError, match="FactorizedResidualVQ"):
        runtime.load(path, backend="ort")
