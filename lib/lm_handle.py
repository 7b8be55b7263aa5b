"""Language models behind a TransformerLens `TransformerBridge`, with the checkpoint's
own transformers model beside it (same weight tensors) for fast forwards and for
structural edits of private copies."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lib import lm_records
from lib.errors import CapabilityError, DataError
from lib.handle import ActivationHook, Caught, ModelHandle, Point, Structure
from lib.hooks import TL_STASHED, count_hooks, forget_tl_stash, forward_hooks
from lib.lm_capabilities import LMBlocks, LMGates, LMHeads
from lib.lm_parts import LMParts, _holds_tensors, _out_dim
from lib.locks import exclusive
from lib.scoring import HELD_LOGITS_BYTES, Logits, ReadLogits
from lib.storage import distinct_tensors


class BridgeHandle(LMParts, ModelHandle):
    """A causal LM behind a TransformerLens `TransformerBridge`."""

    kind = "causal-lm"
    sites = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "z")
    sites += ("ln1_scale", "ln2_scale", "mlp_pre", "mlp_post", "embed", "pos_embed", "ln_final_scale")
    sites += ("q", "k", "mlp_gate")
    _HOOKS = {  # the one place TransformerLens hook names are spelled
        "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
        "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
        "mlp_out": "blocks.{}.hook_mlp_out", "pattern": "blocks.{}.attn.hook_pattern",
        "z": "blocks.{}.attn.hook_z",
        # linearisation (Interpreter view): what it freezes, where it feeds the input; model-level points use layer 0
        "ln1_scale": "blocks.{}.ln1.hook_scale", "ln2_scale": "blocks.{}.ln2.hook_scale",
        "mlp_pre": "blocks.{}.mlp.hook_pre", "mlp_post": "blocks.{}.mlp.hook_post", "embed": "hook_embed",
        "q": "blocks.{}.attn.hook_q", "k": "blocks.{}.attn.hook_k", "mlp_gate": "blocks.{}.mlp.gate.hook_out",
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
            d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )
        self.eval_task = getattr(bridge.original_model.config, "layerscope_eval", "text")
        self._plain_model: nn.Module | None = None
        self._active_hooks = 0
        self._structural = False  # parts removed: the plain model is the model, the bridge is stale
        self._heads: dict[int, list[int]] = {}  # layer -> original indices of the heads still there
        self._kv: dict[int, list[int]] = {}  # layer -> original indices of its key/value heads still there
        self._path_map: dict[str, str] | None = None
        self._hook_names: frozenset[str] | None = None
        self._late_pattern: bool | None = None  # see LMGates._pattern_reported_late
        self._block_path_list: list[str | None] | None = None
        self._block_kwargs: tuple[tuple, list[dict[str, Any]]] | None = None  # input shape -> each layer's kwargs

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
        name = self._HOOKS[point.site].format(point.layer)
        if self._hook_names is None:
            self._hook_names = frozenset(self.model.hook_dict)
        if name not in self._hook_names:
            raise CapabilityError(f"This {self.structure.architecture} has no {point.site!r} activation"
                                  + (" (attention and MLP run in parallel, so no residual stream lies between "
                                     "them)" if point.site == "resid_mid" and self.structure.parallel else "")
                                  + f" at block {point.layer}.")
        return name

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
        return distinct_tensors(iter(named))

    def _linear_modules(self) -> dict[str, nn.Module]:
        """Linear maps by readable name; an attention-only model's placeholder MLPs (weights
        all zero, `structure.d_mlp` 0) are not layers: nothing prunes, quantizes or lists them."""
        placeholder = not self.structure.d_mlp
        return {k: m for k, m in self._modules().items()
                if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
                and not (placeholder and self.place(k)[1] == "mlp")}

    def linear_layers(self) -> dict[str, torch.Tensor]:
        # GPT-2's Conv1D stores [in, out]; every other layer here is an nn.Linear [out, in]
        return {k: m.weight.T if _out_dim(m) else m.weight for k, m in self._linear_modules().items()}

    def _forward_weights_only(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.plain_model()(input_ids=self.check_inputs(inputs)).logits

    def check_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, pos] the model can read: integers in [0, d_vocab), at most n_ctx
        per row (out-of-range ids would index past the embedding; longer rows past the
        positions the model was built for)."""
        s = self.structure
        if not isinstance(inputs, torch.Tensor) or inputs.dtype == torch.bool or inputs.is_floating_point() \
                or inputs.is_complex() or inputs.dim() != 2:
            what = f"a {inputs.dtype} tensor of shape {list(inputs.shape)}" if isinstance(inputs, torch.Tensor) \
                else f"a {type(inputs).__name__}"
            raise DataError(f"A language model reads token ids: an integer tensor [batch, pos], not {what}. "
                            "Encode text with the model's tokenizer.")
        if inputs.numel() and (int(inputs.min()) < 0 or (s.d_vocab and int(inputs.max()) >= s.d_vocab)):
            raise DataError(f"Token ids must lie in 0 ... {s.d_vocab - 1} (this model's vocabulary has {s.d_vocab} "
                            f"tokens), but the input holds ids from {int(inputs.min())} to {int(inputs.max())}. "
                            "Encode text with this model's own tokenizer.")
        if s.n_ctx and inputs.shape[1] > s.n_ctx:
            raise DataError(f"The input has {inputs.shape[1]} tokens per row, but this model reads at most "
                            f"{s.n_ctx} (its context length). Use shorter texts or cut them to {s.n_ctx} tokens.")
        return inputs.to(self.device)  # on the CPU: the same tensor

    @exclusive
    @torch.no_grad()
    def _forward_every_layer(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [batch, pos, vocab]. With no hook active this runs the plain transformers
        model with SDPA attention (the same weights, shared), as fast as Hugging Face's own
        forward; inside `hooks(...)` it runs through the bridge so the hooks fire."""
        if not self._structural and (self._active_hooks or count_hooks(self.model)):
            return self.model(inputs, prepend_bos=False)
        return self.plain_model()(input_ids=inputs).logits

    @exclusive
    @torch.no_grad()
    def outputs(self, inputs: torch.Tensor) -> Logits:
        """As `ModelHandle.outputs`: logits that would take over `HELD_LOGITS_BYTES` come back
        as a `ReadLogits` over the plain model's final hidden state, read out by its own output
        layer as they are scored, after a check on the first tokens that this readout gives
        the forward's logits (else, and inside `hooks(...)`, the forward's logits, held)."""
        inputs = self.check_inputs(inputs)
        hooked = not self._structural and (self._active_hooks or count_hooks(self.model))
        if hooked or self.exit_rule is not None or inputs.numel() * self.structure.d_vocab * 4 <= HELD_LOGITS_BYTES:
            return self.forward(inputs)
        readout, probe = lm_records.head_readout(self), inputs[:1, :16]
        with lm_records.untold():  # a check on 16 tokens: a bar counts the real forward's blocks alone
            expected = self.forward(probe).float()
            same = torch.allclose(readout(lm_records.head_input(self, probe)).float(), expected,
                                  rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
        if not same:
            return self.forward(inputs)
        return ReadLogits(lm_records.head_input(self, inputs), readout, self.structure.d_vocab)

    def outputs_recording(self, inputs: torch.Tensor, points: Sequence[Point]) -> tuple[Logits, dict] | None:
        """As `ModelHandle.outputs_recording`: the plain model's forward, its residual stream kept
        by torch hooks (`lib.lm_records.residuals_kept`), so the outputs are `outputs`' own."""
        if not self._plain_records() or self.exit_rule is not None \
                or (self.structure.parallel and any(p.site == "resid_mid" for p in points)):
            return None
        with self.lock, lm_records.residuals_kept(self, points) as kept:
            outputs = None if kept is None else self.outputs(inputs)
        return None if outputs is None else (outputs, {p: kept[p] for p in points if p in kept})

    @exclusive
    @torch.no_grad()
    def record(self, inputs: torch.Tensor, points: Sequence[Point],
               caught: Caught | None = None) -> dict[Point, torch.Tensor]:
        """As `ModelHandle.record`. Without hooks or edits of the forward, attention patterns
        alone, and residual-stream points alone, come from the plain model (`lib.lm_records`:
        no vocabulary readout, none of the bridge's hook machinery or kept patterns)."""
        if self.structure.parallel and any(p.site == "resid_mid" for p in points):
            return self._record_parallel_mid(inputs, points, caught)
        for p in points:
            self.hook_name(p)  # refuses a layer the model does not have
        hooked = self._active_hooks or count_hooks(self.model)
        if points and all(p.site == "pattern" for p in points) and not hooked:
            if self._structural or self.input_transforms:
                return lm_records.plain_patterns(self, inputs, points)
            return lm_records.all_patterns(self, inputs, points)
        if points and self._plain_records() and all(p.site in lm_records.RESIDUAL_SITES for p in points):
            found = lm_records.plain_residuals(self, inputs, points, caught)
            if found is not None:
                return found
        return super().record(inputs, points, caught)

    def _plain_records(self) -> bool:
        """Whether the plain model's forward is this model's (no hook and no edit of the forward
        that only the bridge carries): then torch hooks on it record the residual stream."""
        return not (self._active_hooks or count_hooks(self.model) or self._structural or self.input_transforms)

    def _record_parallel_mid(self, inputs: torch.Tensor, points: Sequence[Point],
                             caught: Caught | None) -> dict[Point, torch.Tensor]:
        """A parallel block's m_l is x_l + attention's write (what the block's output would be
        with its MLP dropped): recorded as resid_pre + attn_out of the same pass."""
        mids = [p for p in points if p.site == "resid_mid"]
        wanted = [p for p in points if p.site != "resid_mid"]
        wanted += [Point(site, p.layer) for p in mids for site in ("resid_pre", "attn_out")]
        got = self.record(inputs, list(dict.fromkeys(wanted)), caught)
        for p in mids:
            pre, write = Point("resid_pre", p.layer), Point("attn_out", p.layer)
            if pre in got and write in got:
                got[p] = got[pre] + got[write]
        return {p: got[p] for p in points if p in got}

    def _copy_memo(self) -> dict[int, Any]:
        memo = super()._copy_memo()
        if self._block_kwargs is not None:
            memo[id(self._block_kwargs)] = None  # rebuilt for the copy's own modules
        if not self._structural:
            memo[id(self._plain_model)] = None  # rebuilt from the copy's own weights on first use
        for module in self.model.modules():  # activations a forward left behind are not weights
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor) and (value.grad_fn is not None or name in TL_STASHED):
                    memo[id(value)] = None
        return memo

    def told_of_blocks(self, told: Caught) -> Any:
        return lm_records.told_of_blocks(self, told)

    def plain_model(self) -> nn.Module:
        """The checkpoint's own transformers model (SDPA attention, no hook points) sharing
        every weight tensor with the bridge, built on first use: no weights are copied."""
        with self.lock:
            if self._plain_model is None:
                self._plain_model = lm_records.plain_twin(self.hf_model)
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
        # each block drops what TransformerLens stashed of it as soon as it has run (a layer's pattern at a time)
        forget = [(block, lambda module, _args, _out: forget_tl_stash(module)) for block in self.model.blocks]
        with self.lock, self.model.hooks(fwd_hooks=named), forward_hooks(forget):
            self._active_hooks += 1
            try:
                yield
            finally:
                self._active_hooks -= 1
                if not self._active_hooks:
                    forget_tl_stash(self.model)

    # ------------------------------------------------------------------ capabilities

    @property
    def blocks(self) -> LMBlocks:
        return LMBlocks(self)

    @property
    def heads(self) -> LMHeads:
        return LMHeads(self)

    @property
    def gates(self) -> LMGates:
        return LMGates(self)

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


def _tl_hook(fn: ActivationHook) -> Callable:
    def hook(tensor: torch.Tensor, hook: Any = None) -> torch.Tensor | None:
        return fn(tensor)

    return hook
