"""The two examples of the seed README, verbatim but for the import line."""

import torch


def test_vector_quantize_seed_example():
    from vqdeploy import VectorQuantize

    vq = VectorQuantize(
        dim = 256,
        codebook_size = 512,     # codebook size
        decay = 0.8,             # the exponential moving average decay, lower means the dictionary will change faster
        commitment = 1.          # the weight on the commitment loss
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = vq(x) # (1, 1024, 256), (1, 1024), (1)

    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (1, 1024)
    assert commit_loss.shape == (1,)


def test_residual_vq_seed_example():
    from vqdeploy import ResidualVQ

    residual_vq = ResidualVQ(
        dim = 256,
        num_quantizers = 8,      # specify number of quantizers
        codebook_size = 1024,    # codebook size
    )

    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)

    # (1, 1024, 256), (8, 1, 1024), (8, 1)
    # (batch, seq, dim), (quantizer, batch, seq), (quantizer, batch)
    assert quantized.shape == (1, 1024, 256)
    assert indices.shape == (8, 1, 1024)
    assert commit_loss.shape == (8, 1)
