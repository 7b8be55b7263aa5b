"""Quantization (METHODS.md §5), simulated exactly on CPU, with a real int8 kernel beside it.

    formats          number formats (INT8/INT4, NF4, FP8, FP6, binary), scale groups, grids
    quantize         edits: `Quantize` (RTN or QuantEase, W8A8) and `LLMInt8`; outliers,
                     a layer's histogram on its grid
    calibration      QuantEase and the layer-output error it is judged by
    mixed_precision  per-layer sensitivity and a mixed-precision allocation
    kernels          torch's dynamic int8 kernel measured against float32
    plots            histograms on the grid, sensitivity, outlier columns
"""
