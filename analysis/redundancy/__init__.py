"""Layer redundancy (METHODS.md §1; the Redundancy page): how much each block, attention
and MLP sublayer changes the residual stream, how alike depths are, and what dropping
layers really costs.

    similarity  one hooked pass: residual streams, 1 - cos per module, angular distance,
                stage similarity of image models
    cka         linear CKA between depths (exact Gram or d x d form, minibatch estimator)
    drops       the drop sweep (one cached prefix per depth) and dropping modules together
    report      the page's report assembled from the parts, suggested drops, its sentences
    plots       the page's figures

The logit lens per depth is `analysis.lens.logit_lens`.
"""
