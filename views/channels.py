"""Channels page: what each attention head does, which heads talk to which, and what
cutting a channel costs."""

import streamlit as st

from analysis.channels import plots as pc
from analysis.channels import report as rep
from analysis.channels.circuits import MODE_NAMES, MODES, channel_components, head_label
from analysis.channels.heads import HeadEdit
from analysis.metric_text import metric_change, metric_value
from lib.data import MAX_PROMPT_CHARS, check_lm
from lib.metrics import LABELS
from ui import channels as cached
from ui.cache import eval_batch
from ui.glossary import GLOSSARY
from ui.progress import Stopped
from ui.session import require_handle

handle = require_handle()
st.title("Attention channels")
st.caption("Heads pass information between layers through small subspaces of the residual stream: one head "
           "writes a direction, a later head reads it with its queries (Q), keys (K) or values (V). The scores "
           "below come from the weights alone; the last section tests a channel by cutting it.")
if handle.kind != "causal-lm":  # nothing went wrong: this view has nothing to show for an image model
    st.info(f"Attention channels are a transformer's: {handle.spec} is an image model ({handle.kind}) with no "
            "attention heads. Pick a language model in the sidebar (zoo:code-lm, zoo:induction-2l) to see them.")
    st.stop()
check_lm(handle, "Attention channels")
spec = handle.spec
try:
    c, comp, roles = cached.circuits(handle), cached.composition(handle), cached.head_roles(handle)
except Stopped:  # its notice is drawn, with the button that goes on; everything below reads the circuits
    st.stop()
if note := rep.approximation_note(c):
    st.info(note)

st.subheader("What each head does", help=GLOSSARY["attention_head"] + " " + GLOSSARY["head_roles"])
st.plotly_chart(pc.role_grid(roles), width="stretch")
st.caption(f"Scores on {roles.n_sequences} sequences of BOS and three copies of {(roles.seq_len - 1) // 3} distinct "
           "tokens from the evaluation text: the share of each head's attention on the previous token, on earlier "
           "copies of its own token, and on the token after an earlier copy (induction); sink = attention on "
           "position 0. Regime: how many keys carry 90% of a query's attention. " + rep.roles_sentence(roles),
           help=GLOSSARY["attention_sink"] + " " + GLOSSARY["hopfield_regime"])

st.subheader("Which heads talk to which", help=GLOSSARY["composition"] + " " + GLOSSARY["ov_qk_circuits"])
strongest = max((comp.strongest(m, 1)[0] for m in MODES if comp.strongest(m, 1)), key=lambda ch: ch.relative,
                default=None)
if strongest is None:
    st.info(rep.composition_sentence(comp, "K"))
    st.stop()
mode = st.radio("Composition", MODES, index=MODES.index(strongest.mode), horizontal=True,
                format_func=MODE_NAMES.get, key=f"mode_{spec}")
st.caption(rep.circuit_sentence(roles, comp))
pairs, charts = comp.strongest(mode, 30), [f"heat_{spec}_{mode}", f"graph_{spec}_{mode}"]
cached.pick_from_charts(comp, mode, pairs, charts, f"pair_{spec}_{mode}")  # a click in either chart chooses
click = "a cell or an edge's marker" if pc.cells_clickable(comp) else "an edge's marker (this many heads make too " \
    "many cells to click on: hover one for its score)"
pair = pairs[st.selectbox(f"Channel (writer → reader), strongest first; or click {click}",
                          range(len(pairs)), key=f"pair_{spec}_{mode}",
                          format_func=lambda i: f"{pairs[i].label}: {pairs[i].relative:.2f}× baseline")]
left, right = st.columns(2)
left.plotly_chart(pc.composition_heatmap(comp, mode, pair), width="stretch", key=charts[0], on_select="rerun",
                  selection_mode="points")
with right:
    top_n = len(comp.strongest(mode, 30))
    n = st.slider("Strongest channels drawn", 1, top_n, min(8, top_n), key=f"edges_{spec}") if top_n > 1 else 1
    st.plotly_chart(pc.channel_graph(comp, mode, n, roles, pair), width="stretch", key=charts[1],
                    on_select="rerun", selection_mode="points")
st.caption("Score = ‖OV_writer · M_reader‖ / (‖OV_writer‖ ‖M_reader‖), M the reader's QK (Q), QKᵀ (K) or OV (V), "
           f"divided by 1/√d, what random matrices score. Orange heads have a role ({rep.role_rule()}); the red edge "
           "is the chosen channel. " + rep.composition_sentence(comp, mode))

st.subheader(f"The channel {pair.label}: which directions carry it", help=GLOSSARY["singular_values"])
parts = channel_components(c, comp, pair.writer, pair.reader, mode)
st.plotly_chart(pc.component_bars(parts), width="stretch")
st.caption("The writer's OV circuit split by SVD into rank-1 components (strongest first); each bar scores one "
           "direction the writer writes against the reader, the percentage is its share of the pair's composition. "
           "Components with nearly equal singular values can mix freely, so read such a group as one subspace. "
           + rep.components_sentence(parts))
with st.expander("Singular value spectra of every head"):
    st.plotly_chart(pc.spectra_heatmap(c), width="stretch")
    st.caption("Each head's singular values divided by its largest: a row that darkens after a few components is "
               "a circuit of low effective rank.")

st.subheader("Attention on your prompt", help=GLOSSARY["attention_pattern"])
prompt = st.text_area("Prompt", value=cached.example_prompt(handle), max_chars=MAX_PROMPT_CHARS, height=130,
                      key=f"channels_prompt_{spec}")
tokens, patterns = cached.prompt_patterns(handle, prompt)
head_names = [head_label((l, h)) for l in range(c.n_layers) for h in range(c.n_heads)]
shown = st.selectbox("Head", range(len(head_names)), format_func=head_names.__getitem__,
                     index=pair.reader[0] * c.n_heads + pair.reader[1], key=f"head_{spec}_{pair.label}")
layer, head = divmod(shown, c.n_heads)
st.plotly_chart(pc.pattern_heatmap(patterns[layer, head], tokens.labels), width="stretch")
st.caption("Row = the token attending (query), column = the token attended to (key); an induction head lights up "
           "the token after an earlier copy of the current one, a previous-token head the diagonal just below.")
if tokens.unknown:
    st.warning("Not in this model's vocabulary: " + ", ".join(f"“{u}”" for u in tokens.unknown))
if tokens.dropped:
    st.info(f"Only the first {len(tokens.labels)} tokens are shown ({tokens.dropped} dropped).")

st.subheader(f"Cut or amplify {pair.writer_label}")
scope = st.radio("Edit", ["head", "components"], horizontal=True, key=f"scope_{spec}",
                 format_func={"head": f"the whole head {pair.writer_label}",
                              "components": f"only the directions carrying its channel to {pair.reader_label}"}.get)
components: tuple[int, ...] = ()
if scope == "components":
    order = parts.shares.argsort(descending=True).tolist()
    k = st.slider("Directions (largest share first)", 1, len(order), 1, key=f"k_{spec}_{pair.label}")
    components = tuple(order[:k])
alpha = st.slider("Scale α (0 cuts, 1 leaves it as it is)", 0.0, 2.0, 0.0, 0.1, key=f"alpha_{spec}")
try:
    result = cached.intervention(handle, HeadEdit(*pair.writer, components, alpha), pair.reader, prompt)
except Stopped:  # its notice is drawn, with the button that goes on: the rest of the page reads it
    st.stop()
metric, label = result.metric, LABELS[result.metric]
before, after = getattr(result.before, metric), getattr(result.after, metric)
source = eval_batch(handle).source
on_eval = f"Measured on the evaluation set ({source}), not on your prompt."
cols = st.columns(3)
cols[0].metric(f"{label} before", metric_value(metric, before), help=on_eval)
cols[1].metric(f"{label} after", metric_value(metric, after), delta=metric_change(metric, after - before),
               delta_color="normal" if result.higher_is_better else "inverse", help=on_eval)
cols[2].metric("KL to the unedited model", f"{result.after.kl_to_base:.3g}", help=GLOSSARY["kl"])
st.caption(rep.intervention_sentence(result) + f" Evaluation set: {source}; your prompt only gives the reader's "
           "attention patterns below.")
left, right = st.columns(2)
for column, when, pattern in ((left, "before", result.pattern_before), (right, "after", result.pattern_after)):
    column.plotly_chart(pc.pattern_heatmap(pattern, tokens.labels, f"{pair.reader_label} {when}", max_height=520),
                        width="stretch")
