"""Attention channels (METHODS.md §2; the Channels page): what each head does and which
heads talk to which.

    circuits  OV and QK circuits from the weights, Q/K/V composition scores, the low-rank
              components that carry a channel
    heads     head roles, attention patterns on a prompt, cutting or scaling a head or
              component (an intervention measured on the evaluation set)
    report    the sentences the page shows
    plots     the page's figures
"""
