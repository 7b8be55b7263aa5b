"""Linear interpreters (METHODS.md §3; the Interpreter page): the exact linear map a
network applies to one input, with captum's attributions beside it.

    gradients     the float64 private copy gradients run on; the shared error type
    relu          ReLU networks: A(x0) and b(x0) with every mask frozen (LinearScope)
    transformer   transformers: the detached linearisation of one target logit
    attributions  captum's Saliency, InputXGradient, IntegratedGradients, DeepLift beside them
    report        the sentences and table rows the page shows
    plots         the page's figures
"""
