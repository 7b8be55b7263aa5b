"""Streamlit-side glue between the pages (views/) and the analyses: the only package
besides views/ that imports streamlit. Its modules mirror the pages.

    session      the loaded base model, this session's compression lab (which owns the
                 recipe), and the guard every page runs under
    cache        what every page reads about the loaded model: evaluation batch, baseline
                 metrics, base outputs
    store        a no-copy, memory-bounded cache for large tensors (`STORE`)
    experiments  this browser's visitor id; the lab's points stored in the experiments database
    links        the page, model and recipe in the address, and restoring them from it
    progress     progress bars for long work, and results kept in `STORE` under one
    glossary     every term the pages use, in one sentence (the glossary page and tooltips)
    model        the Model page's parts (latency on request, prompt notes)
    redundancy   the Redundancy page's parts, each cached by what it depends on
    channels     the Channels page's parts
    interpreter  the Interpreter page's parts (and the float64 copy gradients run on)
    lab/         the Compression lab page: its panels and one module per method family
"""
