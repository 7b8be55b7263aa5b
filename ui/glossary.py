"""The words LayerScope's pages use, each in one sentence a teacher can read aloud.

`GLOSSARY[key]` is the text for a widget's `help=` tooltip where a term first appears;
`TERMS[key]` adds the term as shown and a group for the glossary page. Definitions
follow docs METHODS.md and what the code computes (lib.metrics, analysis.redundancy).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """name: the term as shown; text: one sentence; group: a heading on the glossary page."""

    name: str
    text: str
    group: str


_INSIDE = "Inside a network"
_COMPARE = "Comparing layers"
_PREDICT = "Reading predictions"
_QUALITY = "Measuring quality"
_SHRINK = "Making a model smaller or faster"
_HEADS = "Attention heads and channels"
_EXPLAIN = "Explaining one output"

TERMS: dict[str, Term] = {
    "residual_stream": Term(
        "residual stream",
        "The vector each token carries through a transformer: every block reads it and adds its own output "
        "to it, so it holds everything the model has worked out about that token so far.", _INSIDE),
    "depth_layer_block": Term(
        "depth, layer, block",
        "A block (also called a layer) is one attention sublayer followed by one MLP sublayer; depth d is the "
        "residual stream between blocks, entering block d, so an L-layer model has depths 0 to L and depth L "
        "is the output of the last block.", _INSIDE),
    "stage": Term(
        "stage",
        "In an image model, one named step of the network (for example a convolution with its activation); "
        "LayerScope compares and drops stages the way it compares and drops blocks in a transformer.", _INSIDE),
    "layernorm": Term(
        "LayerNorm (layer normalisation)",
        "Rescales each token's vector to zero mean and unit length (then applies a learned per-feature scale and "
        "shift) before a sublayer or the unembedding reads it, so what counts is its direction, not its size.",
        _INSIDE),
    "unembedding": Term(
        "unembedding",
        "The last matrix of a language model: it turns the final residual vector into one score (logit) per "
        "vocabulary token, and a softmax turns those scores into next-token probabilities.", _INSIDE),
    "bos": Term(
        "BOS",
        "The beginning-of-sequence token put in front of every text, so that the first real token has "
        "something to look back at.", _INSIDE),
    "attention_sink": Term(
        "attention sink",
        "Many attention heads park most of their attention on the first position (BOS), which then carries "
        "a huge-norm activation; LayerScope skips the first few positions so these outliers do not dominate "
        "every similarity.", _INSIDE),
    "relative_update": Term(
        "relative update ‖y−x‖/‖x‖",
        "How much a block changes the residual stream, relative to what it received: 0.1 means the block "
        "adds a change one tenth as long as the vector that came in.", _INSIDE),
    "fingerprint": Term(
        "fingerprint",
        "A short SHA-256 hash of every weight's name, shape, type and bytes: equal fingerprints mean "
        "bit-identical weights, results are cached by it, and a recipe names the fingerprint of the base model "
        "it applies to.", _INSIDE),
    "attention_head": Term(
        "attention head",
        "One of several small attention units in a layer: each query token weighs the earlier tokens (its "
        "attention pattern), reads a little from each through the head's value map, and writes the result into "
        "the residual stream.", _HEADS),
    "attention_pattern": Term(
        "attention pattern",
        "For one head, how much each token (row, the query) attends to each earlier token (column, the key); "
        "every row sums to 1.", _HEADS),
    "head_roles": Term(
        "previous-token, duplicate-token and induction heads",
        "A previous-token head attends to the token just before; a duplicate-token head to earlier copies of the "
        "current token; an induction head to the token that followed an earlier copy, so it can predict that the "
        "pattern repeats.", _HEADS),
    "hopfield_regime": Term(
        "regime (global / metastable / single pattern)",
        "How many keys carry 90% of a query's attention: nearly all of them (global averaging), a few "
        "(metastable), or one or two (single pattern), as in the Hopfield-network reading of attention.", _HEADS),
    "ov_qk_circuits": Term(
        "OV and QK circuits",
        "A head's two low-rank maps on the residual stream: QK decides where it looks (query x key), OV what it "
        "moves from there into the residual stream (value x output).", _HEADS),
    "composition": Term(
        "Q-, K- and V-composition",
        "A later head reading with its queries, keys or values what an earlier head wrote: the score measures "
        "how much of the writer's OV output falls into the reader's QK or OV input, compared with random "
        "matrices of the same shape (1x = chance).", _HEADS),
    "singular_values": Term(
        "SVD, singular values, components",
        "The singular value decomposition splits a matrix into rank-1 components ordered by strength (their "
        "singular values); a circuit whose values fall off fast uses only a few directions.", _HEADS),
    "one_minus_cos": Term(
        "1 − cos (module importance)",
        "One minus the cosine between a module's input and output, per token, averaged over the evaluation "
        "text: near 0 means the module barely turns the residual stream, so it is a candidate to drop.",
        _COMPARE),
    "cka": Term(
        "CKA (linear centred kernel alignment)",
        "Compares how two layers arrange the same tokens: 1 means the two representations are the same up to "
        "a rotation and a uniform scale, near 0 means no linear relation between them.", _COMPARE),
    "angular_distance": Term(
        "angular distance",
        "The angle between the residual stream at two depths, at the last token, divided by 180 degrees: 0 "
        "means same direction, 0.5 perpendicular, 1 opposite.", _COMPARE),
    "drop": Term(
        "drop (a block, attention, MLP or stage)",
        "Removing a module so that it adds nothing to the residual stream (for an image stage: passing its "
        "input straight through, which only works where its input and output have the same shape), then "
        "measuring again what it cost.", _COMPARE),
    "logit_lens": Term(
        "logit lens",
        "Reading an intermediate depth as if it were the last one: pass its residual stream through the "
        "model's final normalisation and unembedding and see which next token it would predict.", _PREDICT),
    "kl": Term(
        "KL divergence, KL(base ‖ model), nats",
        "How far a predicted distribution is from a reference one, averaged over predicted tokens (or images): 0 "
        "means identical; the reference is the unedited base model (or, in the logit lens, the final layer), and "
        "the unit is nats, natural-log units (1 nat is about 1.44 bits).", _PREDICT),
    "bootstrap": Term(
        "bootstrap interval",
        "How far a metric could move on another evaluation set like this one: the evaluation windows (or "
        "images) are redrawn with replacement 2,000 times and the metric recomputed; the middle 95 % of those "
        "values is the interval. A change against the base is resampled in pairs (the same windows for both).",
        _QUALITY),
    "flipped_answer": Term(
        "flipped answer",
        "A position (or image) where the edited model's most likely answer differs from the base model's; "
        "listed worst first by the KL there.", _QUALITY),
    "verified_outputs": Term(
        "verified outputs",
        "At load, the model's outputs through the hooked path that records activations are compared with its "
        "outputs through plain transformers (or the torch module) on the same input: matching to rounding "
        "means the recorded activations are the model's own.", _INSIDE),
    "top1_agreement": Term(
        "top-1 agreement",
        "The share of positions where two predictions (an edited model and the base, or a depth and the final "
        "layer) pick the same most likely token or class.", _PREDICT),
    "entropy": Term(
        "entropy",
        "How spread out a predicted distribution is, in nats: 0 means the model is certain of one token, and "
        "the log of the vocabulary size means it is guessing uniformly.", _PREDICT),
    "loss": Term(
        "loss (nats per token)",
        "The average negative log-probability the model gave to the token that really came next; lower is "
        "better.", _QUALITY),
    "perplexity": Term(
        "perplexity",
        "e to the power of the loss: the model is as unsure as if it picked uniformly among this many tokens; "
        "lower is better.", _QUALITY),
    "bits_per_byte": Term(
        "bits per byte",
        "The loss over the whole text in bits, divided by the text's length in bytes: how well the model "
        "would compress it, comparable across tokenizers; lower is better.", _QUALITY),
    "psnr": Term(
        "PSNR (dB)",
        "Peak signal-to-noise ratio between the denoised image and the clean one, 10·log10(1 / mean squared "
        "error) for pixels in 0 to 1; higher is better, and 6 dB more means half the error amplitude.",
        _QUALITY),
    "noisy_psnr": Term(
        "PSNR of the noisy input",
        "The reference for a denoiser: the noisy inputs themselves scored against the clean targets, as if the "
        "model changed nothing. A denoiser helps only as far as its PSNR is above this.", _QUALITY),
    "reconstruction_error": Term(
        "reconstruction error",
        "max |A·x0 + b − F(x0)|: the frozen linear map, run at the input, against the real model; below 1e-6 "
        "(computed in float64) the decomposition output = A·input + b is exact up to round-off.", _EXPLAIN),
    "saliency": Term(
        "Saliency",
        "The size of the gradient of the output with respect to each input, |∂F/∂x|: how strongly a small change "
        "there would move the output; unsigned and not a share of the output, so it has no sum rule.", _EXPLAIN),
    "integrated_gradients": Term(
        "Integrated Gradients",
        "Each input times the output's gradient averaged along the straight path from a baseline (here all zeros) "
        "to the input; the attributions add up to F(x0) − F(0), up to the error of the finite steps that "
        "approximate the path integral.", _EXPLAIN),
    "deeplift": Term(
        "DeepLift",
        "Splits F(x0) − F(0) (a zero baseline) over the inputs by passing differences from the baseline back "
        "through each layer with per-layer rules; the parts add up to that difference where the rules cover "
        "every layer (ReLU-type layers, not attention, LayerNorm or GELU, so not a transformer).", _EXPLAIN),
    "sparsity": Term(
        "sparsity",
        "The share of a model's weights that pruning has set to zero: 50% sparsity keeps half of them.",
        _SHRINK),
    "quantization": Term(
        "quantization",
        "Storing weights (or activations) with fewer bits by rounding them to a coarse grid with a scale; "
        "LayerScope simulates it by rounding and then computing in full precision.", _SHRINK),
    "scale_group": Term(
        "scale group (group size)",
        "A run of consecutive weights in one row that share one 16-bit scale (and zero point); smaller groups "
        "follow the weights more closely but store more scales, so each weight costs more bits.", _SHRINK),
    "bits_per_weight": Term(
        "bits per weight",
        "What a quantized weight takes in storage: its code plus its share of its group's 16-bit scale and zero "
        "point (INT4 in groups of 128 takes about 4.16 bits, a float32 weight 32).", _SHRINK),
    "wanda": Term(
        "Wanda pruning",
        "Pruning that scores each weight by |w| times the norm of its input feature over the evaluation batch "
        "(|w_ij| · ‖X_j‖) and zeroes the lowest-scoring weights of each output row, so a small weight on a busy "
        "input can outlive a larger one on a quiet input.", _SHRINK),
    "pareto_frontier": Term(
        "Pareto frontier",
        "The recipes no other tried recipe beats on both counts at once (at most as costly and at least as good, "
        "better in one of the two); any recipe off the frontier has one on it that is cheaper, better or both.",
        _SHRINK),
    "nf4": Term(
        "NF4 (4-bit NormalFloat)",
        "A 4-bit format whose 16 codes are spaced like the quantiles of a normal distribution, scaled per block of "
        "64 weights by the block's largest |w|; on normally distributed weights it errs less than evenly spaced "
        "INT4.", _SHRINK),
    "fp6": Term(
        "FP6 (E3M2)",
        "A 6-bit floating-point format with 3 exponent and 2 mantissa bits (largest value 28), scaled per output "
        "row so that the row's largest |w| maps to 28; like every float format its grid is finer near zero than "
        "at the ends.", _SHRINK),
    "binary_weights": Term(
        "binary weights",
        "Each weight replaced by alpha · sign(w), with alpha the mean |w| of its row: one bit per weight plus a "
        "scale per row; on normally distributed weights the relative squared error is 1 − 2/π, about 0.36.",
        _SHRINK),
    "latency_change": Term(
        "latency change",
        "Edited over base latency, timed together in alternating forwards, with a 95% interval of the median "
        "ratio: 'no measurable change' when it covers 1 or the change is under 5%; 'too noisy to tell' when "
        "the interval is over 10% wide.", _SHRINK),
    "flop_prediction": Term(
        "FLOP prediction",
        "The edited model's forward FLOPs over the base's, counted from the weights it still multiplies: what "
        "latency would do if time followed arithmetic.", _SHRINK),
    "round_to_nearest": Term(
        "round to nearest (RTN)",
        "Quantizing every weight on its own to the closest value of the format's grid: fast and needs no data, "
        "but the rounding errors of a row's weights can add up in the layer's output.", _SHRINK),
    "quantease": Term(
        "QuantEase (calibrated quantization)",
        "Choosing a layer's quantized weights one input column at a time, over several sweeps, so that the "
        "layer's outputs on calibration inputs X change least (||WX - ŴX|| is minimised, not each weight's "
        "own rounding error).", _SHRINK),
    "layer_output_error": Term(
        "layer-output error",
        "||(W - Ŵ)X|| / ||WX||: how far a quantized layer's outputs on calibration inputs X are from the "
        "original layer's, relative to their size.", _SHRINK),
    "activation_quantization": Term(
        "activation quantization",
        "Rounding the inputs of linear layers to 8 bits as the model runs (INT8 per token, FP8 per tensor), so "
        "the products could run on integer or FP8 hardware; W8A8 means 8-bit weights and activations.", _SHRINK),
    "llm_int8": Term(
        "LLM.int8 (outlier split)",
        "Int8 weights and inputs, except the input feature columns where some |x| reaches a threshold: those "
        "stay in 16-bit, because a few huge values would otherwise spoil the scale of every other value.",
        _SHRINK),
    "layer_sensitivity": Term(
        "layer sensitivity",
        "How much the model's outputs move (KL to the base, or PSNR lost) when only that layer is quantized and "
        "every other layer is kept as it is; sensitive layers deserve more bits.", _SHRINK),
    "mixed_precision": Term(
        "mixed precision",
        "Giving layers different formats: the most sensitive ones a wider format (e.g. INT8), the others a "
        "narrower one (e.g. INT4), chosen to meet a size budget or a tolerated quality drop.", _SHRINK),
    "early_exit": Term(
        "early exit",
        "Stopping a token's computation at an intermediate layer once a test says its prediction is settled "
        "(high confidence, low entropy, the same top token for several layers, or a residual that stopped "
        "changing) and reading the prediction out there.", _SHRINK),
    "tuned_lens": Term(
        "tuned lens",
        "A logit lens with one small learned linear map per depth, fitted so that each depth's readout comes as "
        "close as it can to the final layer's prediction (lowest KL); it reads early layers better than the "
        "plain logit lens.", _PREDICT),
    "exit_heads": Term(
        "exit heads",
        "For an image classifier, a small linear classifier on the averaged features after each stage, trained "
        "in seconds on the training digits, so that an image can be classified before the last stage.",
        _PREDICT),
    "max_probability": Term(
        "max probability (confidence)",
        "The probability of the most likely token or class; an early exit on max probability ≥ t stops once "
        "the readout is at least that sure.", _PREDICT),
    "patience": Term(
        "patience (early exit)",
        "An exit rule: stop once the top prediction has stayed the same for t checked layers in a row; it needs "
        "no probability threshold, only agreement between layers.", _SHRINK),
    "state_saturation": Term(
        "state saturation",
        "An exit rule: stop once the cosine between a layer's state and the previous layer's is at least t, "
        "that is the state has stopped turning; it needs no readout to decide.", _SHRINK),
    "exit_layer": Term(
        "exit layer",
        "The number of layers a token (or image) runs before it exits; the model's own depth means it ran every "
        "layer, and the mean over the evaluation set says how deep a typical prediction goes.", _SHRINK),
    "compute_saved": Term(
        "compute saved (early exits)",
        "One minus the work done with exits, counted in multiply-adds, over the work of running every layer; "
        "the exit checks and the keys and values later tokens need from skipped layers are charged, so it can "
        "be negative.", _SHRINK),
    "oracle_savings": Term(
        "oracle savings",
        "Compute saved if the keys and values a skipped layer owes later tokens came for free; real decoding has "
        "to compute them, so this is an upper bound that only an oracle reaches.", _SHRINK),
    "linear_probe": Term(
        "linear probe",
        "A linear classifier trained to read one property of each token (here: ridge regression on one-hot "
        "classes) from one depth's residual stream and tested on other files; high accuracy means the property "
        "is there in linearly readable form.", _INSIDE),
    "control_task": Term(
        "control task",
        "The same probe trained on random classes fixed per token type (Hewitt & Liang; for images, per nearest "
        "prototype image): it can only succeed by memorising what each input is, so it shows how much a probe "
        "manages without the property itself.", _INSIDE),
    "selectivity": Term(
        "selectivity",
        "A probe's accuracy on the property minus its accuracy on the control task; high when the property is "
        "read from the context, near zero or negative when memorising tokens would do as well.", _INSIDE),
    "token_alone_baseline": Term(
        "token alone (baseline)",
        "Each test token answered with the class its token type has most often in training: what the input "
        "token says by itself, before any layer has looked at its context.", _INSIDE),
    "depth_linearity": Term(
        "linear in depth",
        "Whether a weight family's layers lie on a line θ_A + (l/L)·θ_B (Learngene's linear expansion); the "
        "relative residual is what the best such line leaves of each layer's weights.", _COMPARE),
    "shared_blocks": Term(
        "shared blocks",
        "A block that reuses another block's weights plus, optionally, a low-rank correction of the difference; "
        "it saves that block's weights at the cost of the change shown.", _SHRINK),
    "nearest_prototype_baseline": Term(
        "nearest prototype (baseline)",
        "For image probes: each test image answered with the class most frequent, in training, among the images "
        "that share its nearest prototype (one of a fixed set of training images, by raw-pixel distance); what "
        "the input's rough look says by itself. The control task fixes one random class per such cell.", _INSIDE),
}

GLOSSARY: dict[str, str] = {key: term.text for key, term in TERMS.items()}
GROUPS: tuple[str, ...] = (_INSIDE, _HEADS, _COMPARE, _PREDICT, _EXPLAIN, _QUALITY, _SHRINK)


def by_group() -> dict[str, list[Term]]:
    """The terms under their group headings (in GROUPS order), alphabetical within each."""
    return {group: sorted((t for t in TERMS.values() if t.group == group), key=lambda t: t.name.casefold())
            for group in GROUPS}
