"""Pruning and re-expressing weights (METHODS.md §4).

    pruning     edits: magnitude and Wanda pruning, removing heads, dropping blocks /
                attention / MLP / stages (`Drop`), unified layer skipping
    allocation  per-layer sparsity by rate-distortion dynamic programming or an
                evolutionary search (`LayerSparsity`)
    factorize   low-rank factorisation (`LowRank`) and shared blocks (`ShareLayers`)
    plots       distortion curves, allocations, spectra, the search's progress
"""
