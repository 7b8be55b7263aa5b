"""Pure computation over a `lib.handle.ModelHandle`: importable from a notebook, never
imports streamlit. One package per view of the app, each holding its computation, the
sentences its page shows and its figures; the compression methods by family.

    redundancy/    which layers barely matter: similarity, CKA, drop sweep (Redundancy page)
    channels/      what attention heads do and which talk to which (Channels page)
    interpreter/   the exact linear map a network applies to one input (Interpreter page)
    representations/  linear probes at every depth and weights across depth (Representations page)
    compress/      recipes of edits, the lab that measures them, export (Compression lab);
                   prune/, quant/, exits/ hold the edit families
    lens.py        logit and tuned lens: one readout shared by Redundancy and early exits
    predict.py     what a model predicts for one input (Model page)
    plots.py       plotting helpers every view shares, and the Model page's figures
    metric_text.py how every page writes a metric's value and change
"""
