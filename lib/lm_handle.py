"""Language models behind a TransformerLens `TransformerBridge`, with the checkpoint's
own transformers model beside it (same weight tensors) for fast forwards and for
structural edits of private copies."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError, RecipeError
from lib.handle import LM_PARTS, ActivationHook, ModelHandle, Part, Point, Structure, _distinct, _zero, exclusive
from lib.hooks import count_hooks

_STASHED = ("_pattern", "_captured_pre_ln_residual")  # what TransformerLens keeps of the last forward


class BridgeHandle(ModelHandle):
    """A causal LM behind a TransformerLens `TransformerBridge`."""

    kind = "causal-lm"
    sites = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "z")
    sites += ("ln1_scale", "ln2_scale", "mlp_pre", "mlp_post", "embed", "pos_embed", "ln_final_scale")
    _HOOKS = {  # the one place TransformerLens hook names are spelled
        "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
        "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
        "mlp_out": "blocks.{}.hook_mlp_out", "pattern": "blocks.{}.attn.hook_pattern",
        "z": "blocks.{}.attn.hook_z",
        # linearisation (Interpreter view): what it freezes, where it feeds the input; model-level points use layer 0
        "ln1_scale": "blocks.{}.ln1.hook_scale", "ln2_scale": "blocks.{}.ln2.hook_scale",
        "mlp_pre": "blocks.{}.mlp.hook_pre", "mlp_post": "blocks.{}.mlp.hook_post", "embed": "hook_embed",
        "pos_embed": "hook_pos_embed", "ln_final_scale": "ln_final.hook_scale", "ln_final_out": "ln_final.hook_out",
    }
    _TOP = ("embed", "pos_embed", "blocks", "ln_final", "unembed")

    def __init__(self, spec: str, bridge: Any) -> None:
        super().__init__()
        self.spec = spec
        self.model = bridge
        self.tokenizer = bridge.tokenizer
        cfg = bridge.cfg
        self.structure = Structure(
            architecture=str(getattr(cfg, "architecture", None) or type(bridge.original_model).__name__),
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=int(getattr(cfg, "d_mlp", 0) or 0) if self._has_mlp(bridge) else 0,
            d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        )
        self.eval_task = getattr(bridge.original_model.config, "layerscope_eval", "text")
        self._plain_model: nn.Module | None = None
        self._active_hooks = 0
        self._structural = False  # parts removed: the plain model is the model, the bridge is stale
        self._heads: dict[int, list[int]] = {}  # layer -> original indices of the heads still there
        self._path_map: dict[str, str] | None = None

    @staticmethod
    def _has_mlp(bridge: Any) -> bool:
        """False for an attention-only model (no MLP, or MLP weights that are exactly zero)."""
        return any(bool(p.any()) for b in bridge.blocks for p in getattr(b, "mlp", nn.Module()).parameters())

    @property
    def hf_model(self) -> nn.Module:
        return self.model.original_model

    def hook_name(self, point: Point) -> str:
        self.check_point(point)
        L = self.structure.n_layers
        if not isinstance(point.layer, int) or isinstance(point.layer, bool) or not 0 <= point.layer < L:
            raise CapabilityError(f"This model has blocks 0..{L - 1}; there is no block {point.layer!r}.")
        return self._HOOKS[point.site].format(point.layer)

    def _paths(self) -> dict[str, str]:
        """Readable name (`blocks.0.attn.qkv`, `blocks.0.mlp.in`, `unembed`, ...) -> path of
        the Hugging Face module that holds those weights, for every weight module of the
        checkpoint's own model. TransformerLens names its wrappers (`blocks.0.mlp.in`) and
        keeps each Hugging Face module as the wrapper's `_original_component`."""
        if getattr(self, "_path_map", None) is None:
            real = {name for name, _ in self.plain_model().named_modules()}
            hf_paths = {}  # a module TransformerLens also aliases (attn.qkv = attn.c_attn) has one real path
            for name, module in self.hf_model.named_modules(remove_duplicate=False):
                path = name.replace("._original_component", "")
                if path in real:
                    hf_paths.setdefault(id(module), path)
            paths: dict[str, str] = {}
            for name, module in self.model.named_modules(remove_duplicate=False):
                if not name.endswith("._original_component") or not name.startswith(self._TOP):
                    continue
                readable = name[: -len("._original_component")]
                if "_original_component" in readable or readable in paths or id(module) not in hf_paths:
                    continue  # TransformerLens' own split q/k/v views are not modules of the checkpoint
                if _holds_tensors(module):
                    paths[readable] = hf_paths[id(module)]
            self._path_map = paths
        return self._path_map

    def _modules(self) -> dict[str, nn.Module]:
        """Readable name -> the module of the plain model (which shares every weight with
        the bridge) for every weight module still there; removed ones are skipped."""
        plain = self.plain_model()
        out = {}
        for readable, path in self._paths().items():
            try:
                module = plain.get_submodule(path)
            except AttributeError:  # inside a removed block
                continue
            if _holds_tensors(module):
                out[readable] = module
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        named = []
        for readable, module in self._modules().items():
            named += [(f"{readable}.{n}", t) for n, t in module.named_parameters(recurse=False)]
            named += [(f"{readable}.{n}", t) for n, t in module.named_buffers(recurse=False)
                      if t.is_floating_point()]
        return _distinct(iter(named))

    def _linear_modules(self) -> dict[str, nn.Module]:
        return {k: m for k, m in self._modules().items() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}

    def linear_layers(self) -> dict[str, torch.Tensor]:
        # GPT-2's Conv1D stores [in, out]; every other layer here is an nn.Linear [out, in]
        return {k: m.weight.T if _out_dim(m) else m.weight for k, m in self._linear_modules().items()}

    def _forward_weights_only(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.plain_model()(input_ids=inputs).logits

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, vocab]. With no hook active this runs the plain transformers
        model with SDPA attention (the same weights, shared), as fast as Hugging Face's own
        forward; inside `hooks(...)` it runs through the bridge so the hooks fire."""
        if not self._structural and (self._active_hooks or count_hooks(self.model)):
            return self.model(inputs, prepend_bos=False)
        return self.plain_model()(input_ids=inputs).logits

    @exclusive
    @torch.no_grad()
    def record(self, inputs: torch.Tensor, points: Sequence[Point]) -> dict[Point, torch.Tensor]:
        """As `ModelHandle.record`; attention patterns alone come from the plain model's own
        decoder with eager attention asked for its weights (no vocabulary readout, none of
        the bridge's hook machinery), which is how the head-role view reads every layer."""
        hooked = self._active_hooks or count_hooks(self.model)
        if not points or any(p.site != "pattern" for p in points) or hooked or self._structural \
                or self.input_transforms:
            return super().record(inputs, points)
        for p in points:
            self.hook_name(p)  # refuses a layer the model does not have
        plain = self.plain_model()
        plain.set_attn_implementation("eager")  # SDPA computes no weights to return
        try:
            patterns = plain.base_model(input_ids=inputs, output_attentions=True).attentions
        finally:
            plain.set_attn_implementation("sdpa")
        return {p: patterns[p.layer] for p in points}

    def _copy_memo(self) -> dict[int, Any]:
        memo = super()._copy_memo()
        if not self._structural:
            memo[id(self._plain_model)] = None  # rebuilt from the copy's own weights on first use
        for module in self.model.modules():  # activations a forward left behind are not weights
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor) and (value.grad_fn is not None or name in _STASHED):
                    memo[id(value)] = None
        return memo

    def plain_model(self) -> nn.Module:
        """The checkpoint's own transformers model (SDPA attention, no hook points) sharing
        every weight tensor with the bridge, built on first use: no weights are copied."""
        with self.lock:
            if self._plain_model is None:
                self._plain_model = _plain_twin(self.hf_model)
            return self._plain_model

    def _check_whole(self, what: str) -> None:
        """Refuse what runs through the TransformerLens bridge on a copy the bridge does not
        compute: parts removed (only the plain model has them gone), or inputs of linear
        layers transformed (activation quantization: the pre-hooks sit on the plain model)."""
        if self._structural:
            raise CapabilityError(f"This edited copy has parts removed ({', '.join(self.structure.removed)}), "
                                  f"so {what} is not available on it; use the base model or a copy with "
                                  "weight edits only.")
        if self.input_transforms:
            layers = sorted(self.input_transforms)
            raise CapabilityError(f"This edited copy quantizes the inputs of {len(layers)} linear layer(s) "
                                  f"({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}), which "
                                  f"TransformerLens' forward would skip, so {what} is not available on it; "
                                  "use the base model or a copy with weight-only quantization.")

    @contextmanager
    def hooks(self, pairs: Sequence[tuple[Point, ActivationHook]]) -> Iterator[None]:
        self._check_whole("recording or changing activations")
        named = [(self.hook_name(p), _tl_hook(fn)) for p, fn in pairs]
        with self.lock, self.model.hooks(fwd_hooks=named):
            self._active_hooks += 1
            try:
                yield
            finally:
                self._active_hooks -= 1

    @exclusive
    @torch.no_grad()
    def run_block(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Block `layer` alone: resid_pre [batch, pos, d_model] -> resid_post."""
        self._check_whole("running one block")
        out = self.model.blocks[layer](resid)
        return out[0] if isinstance(out, tuple) else out

    @exclusive
    @torch.no_grad()
    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm (recomputed on `resid`) and unembedding: [b, pos, d] -> [b, pos, vocab]."""
        return self.model.unembed(self.model.ln_final(resid))

    @exclusive
    @torch.no_grad()
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm alone, recomputed on `resid`: [..., d] -> [..., d]."""
        return self.model.ln_final(resid)

    @exclusive
    @torch.no_grad()
    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W_U [vocab, d], b_U [vocab] or None) when `readout(h)` is exactly
        `final_norm(h) @ W_U.T + b_U` (checked on a probe), so callers may compute the
        logits in vocabulary blocks; None for any other readout (e.g. soft-capped logits)."""
        w_u, b_u = getattr(self.model.unembed, "W_U", None), getattr(self.model.unembed, "b_U", None)
        if not isinstance(w_u, torch.Tensor) or w_u.dim() != 2:
            return None
        weight = w_u.T  # [vocab, d]
        probe = torch.randn(4, self.structure.d_model, generator=torch.Generator().manual_seed(0))
        probe = probe.to(weight.dtype)
        expected = self.readout(probe).float()
        got = nn.functional.linear(self.final_norm(probe), weight, b_u).float()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            return None
        return weight, b_u

    # drops: a dropped part contributes nothing to the residual stream, bias included

    def drop_problem(self, part: Part) -> str | None:
        L = self.structure.n_layers
        if part.kind not in LM_PARTS:
            return f"A language model's parts are {', '.join(LM_PARTS)}; {part.kind!r} is not one."
        if not isinstance(part.layer, int) or isinstance(part.layer, bool) or not 0 <= part.layer < L:
            return f"{part.kind} {part.layer!r} is not a part of this {L}-layer model (layers 0..{L - 1})."
        if part.kind == "mlp" and not self.structure.d_mlp:
            return "This model has no MLP layers (it is attention-only)."
        gone = {f"{part.kind} {part.layer}", f"block {part.layer}"} & set(self.structure.removed)
        if gone:
            return f"{gone.pop().capitalize()} is already removed from this copy."
        return None

    def _outputs(self, part: Part) -> list[str]:
        return {"block": ["attn_out", "mlp_out"], "attention": ["attn_out"], "mlp": ["mlp_out"]}[part.kind]

    @contextmanager
    def dropping(self, parts: Sequence[Part]) -> Iterator[None]:
        self.check_parts(parts)
        pairs = [(Point(site, p.layer), _zero) for p in parts for site in self._outputs(p)
                 if site != "mlp_out" or self.structure.d_mlp]
        with self.hooks(pairs):
            yield

    @torch.no_grad()
    def remove_(self, part: Part) -> None:
        """Really remove `part` from this private copy: the block, its attention (with the
        LayerNorm that feeds it) or its MLP (likewise) is replaced by a module that passes
        the residual stream on, so its weights and its compute are gone."""
        self.check_parts([part])
        block = self._hf_path(self.model.blocks[part.layer])
        if block is None:
            raise CapabilityError("This model's blocks cannot be removed one by one.")
        plain = self._make_structural()
        if part.kind == "block":
            _set_submodule(plain, block, _RemovedBlock())
        else:
            sub, norm = ("attn", "ln1") if part.kind == "attention" else ("mlp", "ln2")
            _set_submodule(plain, self._hf_path(getattr(self.model.blocks[part.layer], sub)),
                           _RemovedAttention() if part.kind == "attention" else _RemovedMLP())
            norm_path = self._paths().get(f"blocks.{part.layer}.{norm}")
            if norm_path is not None:  # pre-norm: the LayerNorm only fed the removed sublayer
                _set_submodule(plain, norm_path, nn.Identity())
        self.refresh_structure(f"{part.kind} {part.layer}")
        self.weights_changed()

    def heads_left(self, layer: int) -> list[int]:
        """Original indices of the attention heads layer `layer` still has."""
        if {f"block {layer}", f"attention {layer}"} & set(self.structure.removed):
            return []
        return self._heads.get(layer, list(range(self.structure.n_heads)))

    @torch.no_grad()
    def remove_heads_(self, layer: int, heads: Sequence[int]) -> None:
        """Cut heads out of layer `layer` of this private copy: their query, key and value
        rows and their output-projection columns go, so the layer computes fewer heads."""
        if {f"block {layer}", f"attention {layer}"} & set(self.structure.removed):
            raise RecipeError(f"The attention of layer {layer} is already removed from this copy.")
        left = self.heads_left(layer)
        gone = [h for h in heads if h not in left]
        if not 0 <= layer < self.structure.n_layers or gone:
            raise RecipeError(f"Layer {layer} has no head(s) {gone or list(heads)} to remove"
                              + (f" (its heads are {left})." if 0 <= layer < self.structure.n_layers else
                                 f"; the model has layers 0..{self.structure.n_layers - 1}."))
        keep = [i for i, h in enumerate(left) if h not in heads]  # positions in the current weights
        if not keep:
            self.remove_(_Part("attention", layer))
            return
        cfg = self.model.cfg
        if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
            raise CapabilityError("Removing single heads of a grouped-query attention layer is not supported.")
        plain = self._make_structural()
        attention = plain.get_submodule(self._hf_path(self.model.blocks[layer].attn))
        d_head, n_now = self.structure.d_head, len(left)
        rows = torch.cat([torch.arange(i * d_head, (i + 1) * d_head) for i in keep])  # [kept * d_head]
        paths = {k: self._paths().get(f"blocks.{layer}.attn.{k}") for k in ("qkv", "q", "k", "v", "o")}
        if paths["qkv"] is not None:  # fused [q | k | v] columns of a Conv1D [d, 3 * n * d_head]
            fused = plain.get_submodule(paths["qkv"])
            cols = torch.cat([rows + j * n_now * d_head for j in range(3)])
            _slice_(fused, cols, out_dim=_out_dim(fused))
            attention.split_size = len(rows)
        else:
            for k in ("q", "k", "v"):
                proj = plain.get_submodule(paths[k])
                _slice_(proj, rows, out_dim=_out_dim(proj))
        out_proj = plain.get_submodule(paths["o"])
        _slice_(out_proj, rows, out_dim=1 - _out_dim(out_proj), bias=False)  # its inputs are the heads
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, len(keep))
        self._heads[layer] = [left[i] for i in keep]
        self.refresh_structure(f"heads {', '.join(map(str, sorted(heads)))} of layer {layer}")
        self.weights_changed()

    @torch.no_grad()
    def save_pretrained(self, folder: Any) -> None:
        """Write the model as the checkpoint's own architecture: safetensors, config.json
        and the tokenizer. Removed parts cannot be spelled in a standard config, so they
        are written as zeros in their original shapes (a removed head's rows and columns,
        a removed sublayer's weights): the same function, and plain transformers loads it."""
        plain = self.plain_model()
        if self._structural:
            plain = self._dense_model()
        plain.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))

    def _dense_model(self) -> nn.Module:
        """A plain model in the original shapes holding this copy's weights, zeros where parts are gone."""
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.plain_model().config)
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        mine = self.plain_model().state_dict()
        for path, module in self.plain_model().named_modules():  # factorised or shared layers, made dense again
            if hasattr(module, "dense"):
                mine.update({f"{path}.{k}": v for k, v in module.dense().items()})
        state = {}
        for name, meta in dense.state_dict().items():
            tensor = torch.zeros(meta.shape, dtype=meta.dtype)
            if name in mine and mine[name].shape == meta.shape:
                tensor.copy_(mine[name])
            elif name in mine:  # a layer with heads cut out: put the kept heads back in their places
                self._unslice_into(tensor, mine[name], name)
            state[name] = tensor
        dense.load_state_dict(state, assign=True)
        dense.tie_weights()
        return dense.eval()

    def _unslice_into(self, dense: torch.Tensor, kept: torch.Tensor, name: str) -> None:
        layer = next(l for l in self._heads if name.startswith(f"{self._hf_path(self.model.blocks[l])}."))
        d_head, n = self.structure.d_head, self.structure.n_heads
        heads = torch.cat([torch.arange(h * d_head, (h + 1) * d_head) for h in self._heads[layer]])
        for dim in range(dense.dim()):
            if dense.shape[dim] != kept.shape[dim]:
                parts = dense.shape[dim] // (n * d_head)  # 3 for a fused [q | k | v], else 1
                index = torch.cat([heads + j * n * d_head for j in range(parts)])
                dense.index_copy_(dim, index, kept)
                return

    def replace_linear_(self, name: str, module: nn.Module) -> None:
        path = self._paths().get(name)
        if path is None or name not in self._linear_modules():
            raise CapabilityError(f"The model has no linear layer {name!r}.")
        _set_submodule(self._make_structural(), path, module)
        self.refresh_structure(f"{name} replaced")
        self.weights_changed()

    def _make_structural(self) -> nn.Module:
        """From now on the plain model is this copy's model (the bridge no longer matches it)."""
        if self.base_fingerprint is None:
            raise RecipeError("Parts are removed from a private copy (`handle.private_copy()`), "
                              "never from a base model.")
        plain = self.plain_model()
        self._paths()  # while the bridge still matches
        self._structural = True
        return plain

    def _hf_path(self, wrapper: nn.Module) -> str | None:
        """Path, in the plain model, of the Hugging Face module a TransformerLens wrapper wraps."""
        original = getattr(wrapper, "original_component", None)
        for name, module in self.hf_model.named_modules(remove_duplicate=False):
            if module is wrapper or module is original:
                return name.replace("._original_component", "")
        return None

    def _strip_hooks(self) -> None:
        self._active_hooks = 0
        self.model.reset_hooks(including_permanent=True)
        # TransformerLens blocks wire torch pre-hooks whose closures point at the block
        # they were made for; a deep copy keeps those closures, so the copy's forward would
        # write into the base's modules. Drop them here: each block rewires its own copy
        # on its next forward.
        blocks = [m for m in self.model.modules() if hasattr(m, "_capture_hook_handles")]
        stale = {h.id for b in blocks for h in b._capture_hook_handles}
        for module in self.model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in stale & set(hooks):
                    del hooks[key]
        for block in blocks:
            block._capture_hook_handles = []
            block._capture_hooks_wired = False

    # ---- linearisation (Interpreter view)

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

    _forward_every_layer = forward  # the forward defined above, kept as it is; the one below wraps it

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, vocab]: `_forward_every_layer` (the forward above). On a
        private copy with an exit rule (an early-exit edit), each token's logits are those
        the rule reads out at its exit depth instead."""
        if self.exit_rule is None:
            return self._forward_every_layer(inputs)
        states, logits = self.exit_states(inputs)
        return self.exit_rule(self, states, logits)

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


@dataclass(frozen=True)
class _Part:
    kind: str
    layer: int | str


class _RemovedBlock(nn.Module):
    """A removed transformer block: the residual stream passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _RemovedAttention(nn.Module):
    """A removed attention sublayer: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class _RemovedMLP(nn.Module):
    """A removed MLP sublayer: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _holds_tensors(module: nn.Module) -> bool:
    """Whether the module itself (not its children) has parameters or buffers."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, module)


def _out_dim(layer: nn.Module) -> int:
    """Which weight dimension indexes outputs: 0 for nn.Linear [out, in], 1 for GPT-2's Conv1D [in, out]."""
    return 1 if type(layer).__name__ == "Conv1D" else 0


def _slice_(layer: nn.Module, index: torch.Tensor, out_dim: int, bias: bool = True) -> None:
    """Keep only `index` along weight dimension `out_dim` (and of the bias, if it is the output side)."""
    layer.weight = nn.Parameter(layer.weight.index_select(out_dim, index).contiguous(), requires_grad=False)
    if bias and getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, index).contiguous(), requires_grad=False)
    for attr in ("nf", "out_features"):  # Conv1D keeps its output width in nf
        if hasattr(layer, attr) and bias:
            setattr(layer, attr, layer.weight.shape[out_dim])
    if hasattr(layer, "in_features") and not bias:
        layer.in_features = layer.weight.shape[1]


def _plain_twin(wrapped: nn.Module) -> nn.Module:
    """A plain transformers model of `wrapped`'s architecture whose parameters and buffers
    are `wrapped`'s own tensors. TransformerLens wraps each Hugging Face module in place
    (`x._original_component`), so the wrapped model's state dict, with those path segments
    removed, is the plain model's state dict."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(wrapped.config)
    config.output_attentions = False  # TransformerLens asks for patterns; SDPA computes none
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    wanted = set(plain.state_dict())
    state = {}
    for name, tensor in wrapped.state_dict(keep_vars=True).items():
        plain_name = name.replace("._original_component", "")
        if plain_name in wanted and plain_name not in state:
            state[plain_name] = tensor
    for name, param in plain.named_parameters():  # assign=True would impose these flags on ours
        if name in state:
            param.requires_grad_(state[name].requires_grad)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    buffers = {name.replace("._original_component", ""): t for name, t in wrapped.named_buffers()}
    for name, buffer in list(plain.named_buffers()):  # non-persistent ones (rotary inv_freq) are not in a state dict
        if buffer.is_meta and name in buffers:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = buffers[name]
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if left:
        raise CapabilityError(f"The fast forward path cannot find {', '.join(left[:3])} in this model.")
    return plain.eval()


def _tl_hook(fn: ActivationHook) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor | None:
        return fn(tensor)

    return hook
