"""Drop-in namespaces for other quantizer libraries (`vqdeploy.compat.vector_quantize_pytorch`)."""
