"""On-disk formats of quantized models: ours (io), the compressed-tensors export, the GPTQ v1 export."""
