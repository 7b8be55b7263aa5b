"""Benchmarks: each row is a cost relative to a plain forward pass in the same run
(`python -m bench [suite]`).

    common        the GPT-2-small-shaped model, the machine header, interleaved timing
    foundation    evaluate and the handle's forward against a plain forward
    redundancy, channels, interpreter, lab, quantization, allocation, exits   one suite per
                  view or edit family, each against its issue's targets
    pages         real pages in headless Chromium against the computation they need
"""
