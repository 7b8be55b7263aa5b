"""Plumbing shared by analyses and pages; never imports analysis or streamlit.

    models        load a model from a hub name, a local folder or the zoo -> ModelHandle
    checkpoint    read checkpoint files (config, safetensors headers, opted-in pickles,
                  shards) and write an image model's folder
    preflight     checks before anything is allocated: sizes against free memory, weights
                  against the config, a working tokenizer
    config_checks settings in config.json no model can have: sizes that are not positive
                  whole numbers, a bad norm epsilon, an architecture of another family
    handle        ModelHandle, the one interface to a model: forward, record and hooks,
                  private copies, fingerprints; points: Point, Part, Structure (the names
                  of its places); capabilities: what only some views need, as objects
                  (handle.blocks: blocks and readout; handle.heads; handle.gates)
    handle_layers linear layers by readable name: placing, replacing, input transforms,
                  calibration statistics, torch's int8 kernel
    storage       how tensors are stored (StoredAs, quantized bits) and fingerprinted
    lm_handle     the language-model backend (TransformerBridge), with lm_parts (structural
                  edits, saving), lm_capabilities (its blocks, heads and gates) and
                  lm_records (recording through the plain model where nothing hooks it)
    image_handle  the plain-torch image-model backend, with image_regions (its frozen gates)
    data, corpus  evaluation batches and the checks that they fit a model; the stdlib files
                  and digits they come from
    metrics       the Metrics record, evaluate, latency timing; scoring: NLL, KL and
                  top-1 agreement in row chunks, of logits held or read out chunk by chunk
    hooks, layers, locks, errors   hooks that always go, replacement linear layers, the
                  handle's lock, LayerScopeError and its kinds
    zoo/          the bundled models, their cards and their training scripts
"""
