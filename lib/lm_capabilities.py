"""The capabilities of a language model (`lib.capabilities`), each built on its
`BridgeHandle` and reading only what `BridgeBackend` declares: `LMBlocks` (one block run by the
checkpoint's own decoder layer, the final norm and readout), `LMHeads` (per-head OV and QK
circuits through TransformerLens' compatibility mode on a private copy) and `LMGates`
(where the model is not linear in its input, and what the unembedding reads)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from lib.capabilities import Blocks, FrozenGates, Heads
from lib.errors import AnalysisError, CapabilityError
from lib.locks import exclusive
from lib.points import Point, Structure


class BridgeBackend(Protocol):
    """What these capabilities read of their handle; `lib.lm_handle.BridgeHandle` defines each."""

    lock: AbstractContextManager[Any]
    model: Any  # the TransformerBridge
    structure: Structure
    _HOOKS: dict[str, str]  # site -> TransformerLens hook name
    _active_hooks: int  # open `hooks(...)` blocks
    _late_pattern: bool | None  # memo of LMGates._pattern_reported_late
    _block_kwargs: tuple[tuple, list[dict[str, Any]]] | None  # memo of LMBlocks._layer_kwargs

    @property
    def device(self) -> torch.device: ...
    def plain_model(self) -> nn.Module: ...
    def private_copy(self) -> Any: ...
    def _check_whole(self, what: str) -> None: ...
    def _block_paths(self) -> list[str]: ...
    def _modules(self) -> dict[str, nn.Module]: ...
    def _heads_left(self, layer: int) -> list[int]: ...
    def _head_groups(self, layer: int) -> list[list[int]]: ...
    def _qkv_layout(self, layer: int) -> str | None: ...


class _Stop(Exception):
    """Raised in a hook to end a forward once what it waits for is there."""


class _OnHandle:
    """A capability of one handle: its methods hold the handle's lock (`exclusive`)."""

    def __init__(self, handle: BridgeBackend) -> None:
        self.handle = handle
        self.lock = handle.lock


class LMGates(_OnHandle, FrozenGates):
    """Where a language model is not linear in its input embeddings, and what its unembedding reads."""

    def points(self) -> dict[str, list[Point]]:
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
        h = self.handle
        h._check_whole("the linear interpreter")
        cfg = h.model.cfg
        layers = range(h.structure.n_layers)

        def present(sites: Sequence[str], at: Sequence[int]) -> list[Point]:
            return [Point(s, l) for l in at for s in sites if h._HOOKS[s].format(l) in h.model.hook_dict]

        learned = str(getattr(cfg, "positional_embedding_type", "standard")) == "standard"
        inputs = present(("embed",), [0]) + (present(("pos_embed",), [0]) if learned else [])
        if not inputs or inputs[0].site != "embed":
            raise CapabilityError("This model has no token-embedding hook point to feed the linear interpreter.")
        mlp = layers if h.structure.d_mlp else ()
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
        the pattern is reported, not used, and replacing it changes nothing (memoised on the handle)."""
        h = self.handle
        if h._late_pattern is None:
            order: list[str] = []
            names = [h._HOOKS[s].format(0) for s in ("pattern", "z")]
            with h.lock, h.model.hooks(fwd_hooks=[(n, lambda t, hook=None, n=n: order.append(n)) for n in names]):
                with torch.no_grad():
                    h.model(torch.zeros(1, 2, dtype=torch.long, device=h.device), prepend_bos=False)
            pattern, z = names
            h._late_pattern = pattern in order and z in order and order.index(pattern) > order.index(z)
        return h._late_pattern

    def unembedding_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the unembedding reads for `tokens` [batch, pos]: the final LayerNorm's
        output [batch, pos, d_model], with autograd on; the readout itself is not run.
        Hooks of an enclosing `hooks(...)` fire: they may feed the input embeddings
        (points "embed", "pos_embed") and freeze what `points` lists.
        Gradients belong on a private copy."""
        import warnings

        h = self.handle
        h._check_whole("running the model from its embeddings")
        kept: list[torch.Tensor] = []

        def stop(tensor: torch.Tensor, hook: Any = None) -> None:
            kept.append(tensor)
            raise _Stop

        with h.lock, warnings.catch_warnings(), h.model.hooks(fwd_hooks=[(h._HOOKS["ln_final_out"], stop)]):
            # a frozen LayerNorm scale is an edit TransformerLens warns about; here it is the point
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            try:
                with torch.enable_grad():
                    h.model(tokens, prepend_bos=False)
            except _Stop:
                pass
        if not kept:
            raise CapabilityError("The final LayerNorm's output never appeared in this model's forward.")
        return kept[0]


class LMBlocks(_OnHandle, Blocks):
    """A language model's blocks run one at a time by the checkpoint's own decoder layers, and its readout."""

    @exclusive
    @torch.no_grad()
    def run(self, layer: int, resid: torch.Tensor, drop: str | None = None) -> torch.Tensor:
        """Block `layer` alone: resid_pre [batch, pos, d_model] -> resid_post, computed by the
        checkpoint's own decoder layer with what the full forward passes it (rotary
        position embeddings, causal mask, position ids), so chaining every block and
        `readout` reproduces `forward`. drop: "attention" | "mlp", that sublayer adds nothing
        (its output projection's output, bias included, is zero). Hooks set with `hooks(...)`
        do not fire here."""
        h = self.handle
        n_blocks = h.structure.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_blocks:
            raise AnalysisError(f"There is no block {layer!r} to run: this model has blocks 0..{n_blocks - 1}; "
                                "pass one of those.")
        if drop not in (None, "attention", "mlp"):
            raise AnalysisError(f"A block's sublayers are 'attention' and 'mlp'; {drop!r} is not one.")
        if h._active_hooks:
            raise CapabilityError("Running one block uses the checkpoint's own layer, where hooks set with "
                                  "`hooks(...)` do not fire; run `forward` inside `hooks(...)` instead.")
        block = h.plain_model().get_submodule(h._block_paths()[layer])
        kwargs = self._layer_kwargs(resid, layer)
        zeroed = []
        if drop is not None:
            writer = h._modules().get(f"blocks.{layer}.{'attn.o' if drop == 'attention' else 'mlp.out'}")
            if writer is not None:  # a removed sublayer adds nothing already
                zeroed.append(writer.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        try:
            out = block(resid, **kwargs)
        finally:
            for hook in zeroed:
                hook.remove()
        return out[0] if isinstance(out, tuple) else out

    def _layer_kwargs(self, resid: torch.Tensor, layer: int) -> dict[str, Any]:
        """The keyword arguments the model's own forward passes decoder layer `layer` for
        inputs of `resid`'s rows and positions: rotary embeddings, mask (per layer: sliding-
        window layers get their own), position ids. Caught by pre-hooks on one forward of
        zeros per input shape (they do not depend on the tokens); no key/value cache."""
        h = self.handle
        key = (tuple(resid.shape[:2]), str(resid.device), resid.dtype)
        if h._block_kwargs is None or h._block_kwargs[0] != key:
            plain, paths = h.plain_model(), h._block_paths()
            caught: list[dict[str, Any]] = []

            def catch(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
                caught.append({k: None if type(v).__name__.endswith("Cache") else v
                               for k, v in kwargs.items() if k != "hidden_states"})
                if len(caught) == len(paths):
                    raise _Stop

            hooks = [plain.get_submodule(p).register_forward_pre_hook(catch, with_kwargs=True) for p in paths]
            try:
                zeros = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
                plain.base_model(input_ids=zeros, use_cache=False)
            except _Stop:
                pass
            finally:
                for hook in hooks:
                    hook.remove()
            h._block_kwargs = (key, caught)
        return h._block_kwargs[1][layer]

    @exclusive
    @torch.no_grad()
    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm (recomputed on `resid`) and unembedding: [b, pos, d] -> [b, pos, vocab]."""
        return self.handle.model.unembed(self.handle.model.ln_final(resid))

    @exclusive
    @torch.no_grad()
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm alone, recomputed on `resid`: [..., d] -> [..., d]."""
        return self.handle.model.ln_final(resid)

    @exclusive
    @torch.no_grad()
    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W_U [vocab, d], b_U [vocab] or None) when `readout(h)` is exactly
        `final_norm(h) @ W_U.T + b_U` (checked on a probe), so callers may compute the
        logits in vocabulary blocks; None for any other readout (e.g. soft-capped logits)."""
        unembed = self.handle.model.unembed
        w_u, b_u = getattr(unembed, "W_U", None), getattr(unembed, "b_U", None)
        if not isinstance(w_u, torch.Tensor) or w_u.dim() != 2:
            return None
        weight = w_u.T  # [vocab, d]
        probe = torch.randn(4, self.handle.structure.d_model, generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.dtype)
        expected = self.readout(probe).float()
        got = nn.functional.linear(self.final_norm(probe), weight, b_u).float()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            return None
        return weight, b_u


class LMHeads(_OnHandle, Heads):
    """A language model's attention heads (the handle's bookkeeping of removed heads) and
    their circuits, through TransformerLens."""

    def left(self, layer: int) -> list[int]:
        return self.handle._heads_left(layer)

    def groups(self, layer: int) -> list[list[int]]:
        return self.handle._head_groups(layer)

    def qkv_layout(self, layer: int) -> str | None:
        return self.handle._qkv_layout(layer)

    def circuit_model(self) -> Any:
        """A TransformerLens bridge in compatibility mode on a private copy of this model:
        LayerNorm gains folded into the weights that read the residual stream, writing
        weights centred (HookedTransformer's processed coordinates). Compatibility mode
        rewrites weights in place, which is why it never runs on this model itself. For
        weight-only circuit analyses, and for checks against TransformerLens' own."""
        h = self.handle
        h._check_whole("the weight circuits")
        circuit_copy = h.private_copy()
        try:
            with torch.no_grad():
                circuit_copy.model.enable_compatibility_mode(disable_warnings=True)
        except (RuntimeError, NotImplementedError, AttributeError, KeyError) as e:
            raise CapabilityError(f"This model's weights cannot be put in circuit form (TransformerLens "
                                  f"compatibility mode failed: {e}).") from e
        return circuit_copy.model

    def circuits(self) -> dict[str, Any]:
        """Per-head factors of the OV circuit (W_V · W_O) and the QK circuit (W_Q · W_K^T) in
        HookedTransformer's processed coordinates, read from the bridge's attention weights
        one layer at a time when asked ("layer"), never all at once and never from a copy of
        the model: the first norm's scale folded into W_Q, W_K, W_V (1 + w where the model's
        RMSNorm stores an offset, as Gemma's); for LayerNorm models the reading weights
        centred over d_model and W_O's rows centred, as TransformerLens'
        `enable_compatibility_mode` processes them (`circuit_model()`; the tests hold the two
        equal on every family):

        "layer": layer -> {"W_Q": [H, d_model, d_head], "W_K", "W_V": [H_kv, d_model, d_head]
        (a grouped-query model's key/value heads, not repeated), "W_O": [H, d_head, d_model]},
        float32; "n_layers", "n_heads", "d_model", "n_kv_heads"; "positional": "rotary",
        "standard" (learned absolute), ...
        """
        h = self.handle
        h._check_whole("the weight circuits")
        s, cfg = h.structure, h.model.cfg
        return {"layer": self._circuit_layer, "n_layers": s.n_layers, "n_heads": s.n_heads,
                "d_model": s.d_model, "n_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
                "positional": str(getattr(cfg, "positional_embedding_type", "standard"))}

    @exclusive
    @torch.no_grad()
    def _circuit_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """One layer's factors of `circuits` (float32, folded and centred as it says)."""
        bridge, cfg = self.handle.model, self.handle.model.cfg
        adapter = getattr(bridge, "adapter", None)
        norm = str(getattr(cfg, "normalization_type", "LN"))
        fold = getattr(adapter, "supports_fold_ln", True)
        block = bridge.blocks[layer]
        w = {name: getattr(block.attn, name).detach().float() for name in ("W_Q", "W_K", "W_V", "W_O")}
        scale = _norm_scale(getattr(block, "ln1", None), cfg) if fold else None
        for name in ("W_Q", "W_K", "W_V"):
            if scale is not None:
                w[name] = w[name] * scale[None, :, None]
            if fold and norm in ("LN", "LNPre"):  # a LayerNorm's output has mean 0: read it centred
                w[name] = w[name] - w[name].mean(-2, keepdim=True)
        if (norm in ("LN", "LNPre") and not getattr(cfg, "final_rms", False)
                and getattr(adapter, "supports_center_writing_weights", True)):
            w["W_O"] = w["W_O"] - w["W_O"].mean(-1, keepdim=True)
        return w


def _norm_scale(norm: nn.Module | None, cfg: Any) -> torch.Tensor | None:
    """The elementwise scale a norm multiplies by (float32 [d_model]; 1 + w for an RMSNorm
    stored as an offset), or None for a norm without one."""
    weight = getattr(norm, "weight", None) if norm is not None else None
    if not isinstance(weight, torch.Tensor):
        return None
    weight = weight.detach().float()
    return 1.0 + weight if getattr(cfg, "rmsnorm_uses_offset", False) else weight
