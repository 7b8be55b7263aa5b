"""What the Interpreter, Redundancy, early exits and Channels views read from a language
model: where it is not linear in its input, one block run on its own, the residual stream
entering every block, and the per-head OV and QK circuits. A mixin of `BridgeHandle` (lib/lm_handle.py)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from lib.errors import AnalysisError, CapabilityError
from lib.handle import ActivationHook, Point
from lib.hooks import count_hooks
from lib.locks import exclusive


class LMViews:
    """Linearisation points, blocks run one at a time, exit states and head circuits of a `BridgeHandle`."""

    class _Stop(Exception):
        """Raised in a hook to end a forward once what it waits for is there."""

    def linearisation_points(self) -> dict[str, list[Point]]:
        """Where this model is not linear in its input embeddings, grouped by how a detached
        linearisation (METHODS.md §3) freezes each at its value for one input.

        "scale": every LayerNorm / RMSNorm scale [batch, pos, 1] (ln1, ln2 of each block
        where there is one, then the final one); "pattern": every attention pattern
        [batch, head, query, key]; "query_key": instead, where the model reports its pattern
        only after using it (OPT), each layer's queries and keys (q, k: frozen, the
        pattern computed from them is too); "gate_in" / "gate_out": each plain MLP's
        pre-activation p and activation act(p) [batch, pos, d_mlp], same layers in the same
        order (frozen as p · act(p)/p); "gate_branch": each gated MLP's gate branch
        x·W_gate (frozen, so act(x·W_gate) ⊙ x·W_up is linear in x); "inputs": where the
        input enters, the token embedding ("embed") and, for learned positions, the
        position embedding ("pos_embed"), [batch, pos, d_model] each (rotary positions act
        inside attention, whose pattern is frozen).
        Raises CapabilityError for a model this cannot make exactly linear.
        """
        self._check_whole("the linear interpreter")
        cfg = self.model.cfg
        layers = range(self.structure.n_layers)

        def present(sites: Sequence[str], at: Sequence[int]) -> list[Point]:
            return [Point(s, l) for l in at for s in sites if self._HOOKS[s].format(l) in self.model.hook_dict]

        learned = str(getattr(cfg, "positional_embedding_type", "standard")) == "standard"
        inputs = present(("embed",), [0]) + (present(("pos_embed",), [0]) if learned else [])
        if not inputs or inputs[0].site != "embed":
            raise CapabilityError("This model has no token-embedding hook point to feed the linear interpreter.")
        mlp = layers if self.structure.d_mlp else ()
        gated = bool(getattr(cfg, "gated_mlp", False))
        if gated and len(present(("mlp_gate",), mlp)) != len(mlp):
            raise CapabilityError("This model's gated MLPs show no gate branch to freeze, so the linear "
                                  "interpreter cannot make them linear; use a model with plain MLPs.")
        late = self._pattern_reported_late()
        attention = present(("q", "k") if late else ("pattern",), layers)
        return {"scale": present(("ln1_scale", "ln2_scale"), layers) + present(("ln_final_scale",), [0]),
                "pattern": [] if late else attention, "query_key": attention if late else [],
                "gate_branch": present(("mlp_gate",), mlp) if gated else [],
                "gate_in": [] if gated else present(("mlp_pre",), mlp),
                "gate_out": [] if gated else present(("mlp_post",), mlp), "inputs": inputs}

    def _pattern_reported_late(self) -> bool:
        """Whether block 0's attention pattern hook fires after its head outputs (z): then
        the pattern is reported, not used, and replacing it changes nothing."""
        if self._late_pattern is None:
            order: list[str] = []
            names = [self._HOOKS[s].format(0) for s in ("pattern", "z")]
            with self.lock, self.model.hooks(fwd_hooks=[(n, lambda t, hook=None, n=n: order.append(n)) for n in names]):
                with torch.no_grad():
                    device = next(self.model.parameters()).device
                    self.model(torch.zeros(1, 2, dtype=torch.long, device=device), prepend_bos=False)
            pattern, z = names
            self._late_pattern = pattern in order and z in order and order.index(pattern) > order.index(z)
        return self._late_pattern

    def unembedding_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the unembedding reads for `tokens` [batch, pos]: the final LayerNorm's
        output [batch, pos, d_model], with autograd on; the readout itself is not run.
        Hooks of an enclosing `hooks(...)` fire: they may feed the input embeddings
        (points "embed", "pos_embed") and freeze what `linearisation_points` lists.
        Gradients belong on a private copy."""
        import warnings

        self._check_whole("running the model from its embeddings")
        kept: list[torch.Tensor] = []

        def stop(tensor: torch.Tensor, hook: Any = None) -> None:
            kept.append(tensor)
            raise self._Stop

        with self.lock, warnings.catch_warnings(), self.model.hooks(fwd_hooks=[(self._HOOKS["ln_final_out"], stop)]):
            # a frozen LayerNorm scale is an edit TransformerLens warns about; here it is the point
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            try:
                with torch.enable_grad():
                    self.model(tokens, prepend_bos=False)
            except self._Stop:
                pass
        if not kept:
            raise CapabilityError("The final LayerNorm's output never appeared in this model's forward.")
        return kept[0]

    # ---- blocks one at a time (the drop sweep, distortion curves)

    @exclusive
    @torch.no_grad()
    def run_block(self, layer: int, resid: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        """Block `layer` alone: resid_pre [batch, pos, d_model] -> resid_post, computed by the
        checkpoint's own decoder layer with what the full forward passes it (rotary
        position embeddings, causal mask, position ids), so chaining every block and
        `readout` reproduces `forward`. drop: "attention" | "mlp", that sublayer adds nothing
        (its output projection's output, bias included, is zero). Hooks set with `hooks(...)`
        do not fire here."""
        n_blocks = self.structure.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_blocks:
            raise AnalysisError(f"There is no block {layer!r} to run: this model has blocks 0..{n_blocks - 1}; "
                                "pass one of those.")
        if drop not in (None, "attention", "mlp"):
            raise AnalysisError(f"A block's sublayers are 'attention' and 'mlp'; {drop!r} is not one.")
        if self._active_hooks:
            raise CapabilityError("Running one block uses the checkpoint's own layer, where hooks set with "
                                  "`hooks(...)` do not fire; run `forward` inside `hooks(...)` instead.")
        plain = self.plain_model()
        block = plain.get_submodule(self._block_paths()[layer])
        kwargs = self._layer_kwargs(resid, layer)
        zeroed = []
        if drop is not None:
            writer = self._modules().get(f"blocks.{layer}.{'attn.o' if drop == 'attention' else 'mlp.out'}")
            if writer is not None:  # a removed sublayer adds nothing already
                zeroed.append(writer.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        try:
            out = block(resid, **kwargs)
        finally:
            for handle in zeroed:
                handle.remove()
        return out[0] if isinstance(out, tuple) else out

    def _block_paths(self) -> list[str]:
        """Path of each block's decoder layer in the plain model (kept: removing a block
        puts its replacement at the same path)."""
        if self._block_path_list is None:
            self._block_path_list = [self._hf_path(block) for block in self.model.blocks]
        paths = self._block_path_list
        if None in paths:
            raise CapabilityError("This model's blocks are not found in its transformers model, so they cannot "
                                  "be run one by one.")
        return paths

    def _layer_kwargs(self, resid: torch.Tensor, layer: int) -> dict[str, Any]:
        """The keyword arguments the model's own forward passes decoder layer `layer` for
        inputs of `resid`'s rows and positions: rotary embeddings, mask (per layer: sliding-
        window layers get their own), position ids. Caught by pre-hooks on one forward of
        zeros per input shape (they do not depend on the tokens); no key/value cache."""
        key = (tuple(resid.shape[:2]), str(resid.device), resid.dtype)
        if self._block_kwargs is None or self._block_kwargs[0] != key:
            plain, paths = self.plain_model(), self._block_paths()
            caught: list[dict[str, Any]] = []

            def catch(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
                caught.append({k: None if type(v).__name__.endswith("Cache") else v
                               for k, v in kwargs.items() if k != "hidden_states"})
                if len(caught) == len(paths):
                    raise self._Stop

            hooks = [plain.get_submodule(p).register_forward_pre_hook(catch, with_kwargs=True) for p in paths]
            try:
                zeros = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
                plain.base_model(input_ids=zeros, use_cache=False)
            except self._Stop:
                pass
            finally:
                for hook in hooks:
                    hook.remove()
            self._block_kwargs = (key, caught)
        return self._block_kwargs[1][layer]

    # ---- early exits

    @exclusive
    @torch.no_grad()
    def exit_states(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """h_0..h_{L-1} (the residual stream entering each block, [batch, pos, d_model]) and
        the logits [batch, pos, vocab], from one `_forward_every_layer`. Without hooks the
        plain model runs and torch pre-hooks on its blocks catch their inputs (a removed
        block's too, which `output_hidden_states` leaves out); inside `hooks(...)` the bridge
        runs, so those hooks fire as well."""
        L = self.structure.n_layers
        states: dict[int, torch.Tensor] = {}
        if not self._structural and (self._active_hooks or count_hooks(self.model)):

            def keep(layer: int) -> ActivationHook:
                def hook(tensor: torch.Tensor) -> None:
                    states[layer] = tensor

                return hook

            with self.hooks([(Point("resid_pre", layer), keep(layer)) for layer in range(L)]):
                logits = self._forward_every_layer(inputs)
            return [states[layer] for layer in range(L)], logits

        def catch(layer: int) -> Callable:
            def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                states[layer] = args[0] if args else kwargs["hidden_states"]

            return pre_hook

        blocks = enumerate(self.plain_model().get_submodule(path) for path in self._block_paths())
        handles = [block.register_forward_pre_hook(catch(layer), with_kwargs=True) for layer, block in blocks]
        try:
            logits = self._forward_every_layer(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return [states[layer] for layer in range(L)], logits

    # ---- circuits (Channels view)

    def circuit_model(self) -> Any:
        """A TransformerLens bridge in compatibility mode on a private copy of this model:
        LayerNorm gains folded into the weights that read the residual stream, writing
        weights centred (HookedTransformer's processed coordinates). Compatibility mode
        rewrites weights in place, which is why it never runs on this model itself. For
        weight-only circuit analyses, and for checks against TransformerLens' own."""
        self._check_whole("the weight circuits")
        circuit_copy = self.private_copy()
        try:
            with torch.no_grad():
                circuit_copy.model.enable_compatibility_mode(disable_warnings=True)
        except (RuntimeError, NotImplementedError, AttributeError, KeyError) as e:
            raise CapabilityError(f"This model's weights cannot be put in circuit form (TransformerLens "
                                  f"compatibility mode failed: {e}).") from e
        return circuit_copy.model

    @torch.no_grad()
    def head_circuits(self) -> dict[str, Any]:
        """Per-head factors of the OV and QK circuits, from TransformerLens' `FactoredMatrix`
        objects `bridge.OV` (W_V · W_O) and `bridge.QK` (W_Q · W_K^T) on `circuit_model()`
        (LayerNorm folded in), as detached float32 tensors:

        "W_Q", "W_K", "W_V": [L, H, d_model, d_head] (grouped-query K and V repeated to
        every query head they serve); "W_O": [L, H, d_head, d_model]; "n_kv_heads": key/
        value heads per layer; "positional": "rotary", "standard" (learned absolute), ...
        """
        bridge = self.circuit_model()
        ov, qk = bridge.OV, bridge.QK
        cfg = bridge.cfg
        return {"W_Q": qk.A.detach().float().clone(), "W_K": qk.B.transpose(-2, -1).detach().float().clone(),
                "W_V": ov.A.detach().float().clone(), "W_O": ov.B.detach().float().clone(),
                "n_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
                "positional": str(getattr(cfg, "positional_embedding_type", "standard"))}
