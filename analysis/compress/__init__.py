"""Compression (METHODS.md §4-6; the Compression lab): a recipe is an ordered list of
edits applied to a private copy of the base model; the lab measures every recipe tried.

    edits     the `Edit` base class, the registry and the one verb `apply_`
    recipe    `Recipe` (ordered edits, JSON) and `build(base, recipe)`
    lab       `Lab`: the current recipe, undo/redo, prefix-cached copies, measurements
    history   what the lab records: `LabPoint`, quality metric, Pareto front, per-layer summary
    journal   every lab point kept in SQLite (`Journal`), per visitor and model
    export    the edited model as a zip, the recipe file, the history CSV, the HTML report
    plots     the lab's figures

The edit families:

    prune/    magnitude, Wanda, heads, drops, layer skipping; rate-distortion allocation
              and evolutionary search; low rank and shared blocks
    quant/    number formats, RTN and QuantEase, LLM.int8, mixed precision, real int8 kernels
    exits/    early exits: criteria, one-pass statistics, cost model, the exit edit
"""
