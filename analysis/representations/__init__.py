"""Representations (the Representations page): what each depth of a model knows, read by
linear probes, and how its weights change with depth.

    code_labels  properties of every character of Python source from `tokenize` and `ast`:
                 token kind, bracket depth, inside a string or comment, indentation level,
                 the AST node type around it
    dataset      the evaluation text's token windows with each token's properties
                 (byte-level tokenizers by byte, others by offsets), the train/test split
    probes       one recorded pass, a ridge-regression probe per property and depth, with
                 the majority class, the token alone and Hewitt & Liang's control task
    image_labels properties of digit images from their pixels (ink mass, stroke thickness),
                 the control task's cells (nearest prototype in raw pixels)
    stage_probes the same probes on an image model's input and every stage's output: class,
                 ink mass, stroke thickness
    depth        weights across depth: θ_A + (l/L)·θ_B per weight family (a fused Q/K/V
                 split into Q, K and V), cosines between consecutive layers, what the lab's
                 shared-blocks edit would lose per pair
    report       the sentences the page shows
    plots        the page's figures

From a notebook:

    from lib.models import load_model
    from analysis.representations import depth_fit, probe_layers, probe_stages

    handle = load_model("zoo:code-lm")
    probes = probe_layers(handle)   # ProbeResult: accuracy, control [P, D]; majority, token_alone [P]
    fit = depth_fit(handle)         # DepthFit: residual [F, n], cosine and share_loss [F, n-1]
    stages = probe_stages(load_model("zoo:digits-cnn"))   # ProbeResult, depths "input", "conv1", ...
"""

from analysis.representations.depth import DepthFit, depth_fit
from analysis.representations.probes import ProbeResult, probe_layers
from analysis.representations.stage_probes import ProbeImages, probe_images, probe_stages

__all__ = ["DepthFit", "ProbeImages", "ProbeResult", "depth_fit", "probe_images", "probe_layers", "probe_stages"]
