"""Early exits (METHODS.md §6): let each token (or image) stop at the first layer where a
criterion says its prediction is settled, and read the prediction out there. This package
is the interface the lab and notebooks use:

    stats = collect_exit_stats(handle, batch, "logit")     # one recorded pass
    curves = exit_curves(stats)                            # every criterion over its thresholds
    point = exit_at(stats, "max_prob", 0.9)                # one threshold: exit depths, compute saved
    edit = EarlyExit("max_prob", 0.9, "logit")             # the recipe edit that exits this way

Modules:
    readouts  the checked depths, the lenses a model exits through, exit heads, trained lenses
    stats     the one pass: every depth's readout statistics (max prob, entropy, argmax, ...)
    cost      the cost model: FLOPs of layers run and exit checks
    rule      the four criteria, thresholds, curves, the best exit, and the early-exit edit
              (`EarlyExit`, which gives a private copy the `ExitRule`)
    inputs    where the predictions for one prompt or a few images exit
    plots     trade-off curves, tokens coloured by exit layer, lens KL lines
"""

from analysis.compress.exits.cost import CostModel
from analysis.compress.exits.inputs import InputExits, depth_label, image_exits, prompt_exits
from analysis.compress.exits.readouts import exit_depths, exit_lens, has_trained, lens_choices, remember_lens
from analysis.compress.exits.rule import (
    CRITERIA,
    CRITERION_LABELS,
    MAX_AGREEMENT_LOSS,
    EarlyExit,
    ExitCurve,
    ExitPoint,
    ExitRule,
    ThresholdRange,
    best_exit,
    default_thresholds,
    exit_at,
    exit_curve,
    exit_curves,
    exits_of,
    threshold_grid,
    threshold_range,
)
from analysis.compress.exits.stats import ExitStats, LensKL, collect_exit_stats, lens_kl
from analysis.lens import LENS_LABELS, LENSES, ExitLens

__all__ = [
    "CRITERIA", "CRITERION_LABELS", "LENSES", "LENS_LABELS", "CostModel", "EarlyExit", "ExitCurve", "ExitLens",
    "ExitPoint", "ExitRule", "ExitStats", "InputExits", "LensKL", "ThresholdRange", "collect_exit_stats",
    "default_thresholds", "depth_label", "exit_at", "exit_curve", "exit_curves", "exit_depths", "exit_lens",
    "exits_of", "has_trained", "image_exits", "lens_choices", "lens_kl", "prompt_exits", "remember_lens",
    "threshold_range", "threshold_grid", "best_exit", "MAX_AGREEMENT_LOSS",
]
