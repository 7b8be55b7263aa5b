"""What the Interpreter, early exits and Channels views read from a language model:
where it is not linear in its input, the residual stream entering every block, and the
per-head OV and QK circuits. A mixin of `BridgeHandle` (lib/lm_handle.py)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError
from lib.handle import ActivationHook, Point
from lib.hooks import count_hooks
from lib.locks import exclusive


class LMViews:
    """Linearisation points, exit states and head circuits of a `BridgeHandle`."""

    class _Stop(Exception):
        """Raised in a hook to end a forward once the final LayerNorm's output is there."""

    def linearisation_points(self) -> dict[str, list[Point]]:
        """Where this model is not linear in its input embeddings, grouped by how a detached
        linearisation (METHODS.md §3) freezes each at its value for one input.

        "scale": every LayerNorm scale [batch, pos, 1] (ln1, ln2 of each block, then the
        final one); "pattern": every attention pattern [batch, head, query, key];
        "gate_in" / "gate_out": each MLP's pre-activation p and activation act(p)
        [batch, pos, d_mlp], same layers in the same order (frozen as p · act(p)/p);
        "inputs": where the input enters, the token embedding ("embed") and, for learned
        positions, the position embedding ("pos_embed"), [batch, pos, d_model] each.
        Raises CapabilityError for a model this cannot make exactly linear.
        """
        self._check_whole("the linear interpreter")
        cfg = self.model.cfg
        if getattr(cfg, "gated_mlp", False):
            raise CapabilityError(
                "This model's MLPs are gated (act(x·W_gate) ⊙ x·W_up): with the gate frozen the output is still a "
                "product of two paths from the input, so the detached linearisation would not be exact. "
                "It supports GPT-2-style MLPs (act(x·W_in)·W_out).")
        layers = range(self.structure.n_layers)

        def present(sites: Sequence[str], at: Sequence[int]) -> list[Point]:
            return [Point(s, l) for l in at for s in sites if self._HOOKS[s].format(l) in self.model.hook_dict]

        inputs = present(("embed", "pos_embed"), [0])
        if not inputs or inputs[0].site != "embed":
            raise CapabilityError("This model has no token-embedding hook point to feed the linear interpreter.")
        mlp = layers if self.structure.d_mlp else ()
        return {"scale": present(("ln1_scale", "ln2_scale"), layers) + present(("ln_final_scale",), [0]),
                "pattern": present(("pattern",), layers), "gate_in": present(("mlp_pre",), mlp),
                "gate_out": present(("mlp_post",), mlp), "inputs": inputs}

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

        paths = [self._hf_path(self.model.blocks[layer]) for layer in range(L)]
        if None in paths:
            raise CapabilityError("This model's blocks are not found in its transformers model, so their "
                                  "states cannot be read for early exits.")
        blocks = enumerate(self.plain_model().get_submodule(path) for path in paths)
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
