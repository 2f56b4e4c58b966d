"""Quantization core: grids and solvers (pure tensor functions), packed storage, checkpoints.

    grid.py     QuantGrid, QuantizedWeight, fit/quantize/dequantize, RTN
    gptq.py     the GPTQ solver (and GPTAQ's in-loop correction), QEP's target correction
    pack.py     bit packing of codes (2/3/4/8 bits)
    modules.py  QuantizedLinear / QuantizedEmbedding: packed weights in memory, dequantized on the fly
"""
