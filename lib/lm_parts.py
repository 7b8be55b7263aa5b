"""Structural edits of a language model's private copy: dropping or removing blocks,
attention and MLP sublayers, removing heads, replacing linear layers, and writing the
edited model back as a dense checkpoint. A mixin of `BridgeHandle` (lib/lm_handle.py)."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError, RecipeError
from lib.handle import LM_PARTS, Part, Point, Structure


class LMParts:
    """Drops and removals on a `BridgeHandle`. What they read of that class is declared
    here (set in `BridgeHandle.__init__` or defined by it and `ModelHandle`)."""

    structure: Structure
    model: Any  # the TransformerBridge
    tokenizer: Any
    base_fingerprint: str | None
    hf_model: nn.Module  # the checkpoint's transformers model inside the bridge
    _structural: bool  # parts removed: the plain model is the model
    _active_hooks: int
    _heads: dict[int, list[int]]  # layer -> original indices of the heads still there
    _kv: dict[int, list[int]]  # layer -> original indices of its key/value heads still there
    plain_model: Callable[[], nn.Module]
    hooks: Callable[[Sequence[tuple[Point, Callable]]], AbstractContextManager[None]]
    check_parts: Callable[[Sequence[Part]], None]
    refresh_structure: Callable[[str | None], None]
    weights_changed: Callable[[], None]
    _paths: Callable[[], dict[str, str]]  # readable name -> module path in the plain model
    _block_paths: Callable[[], list[str]]
    _linear_modules: Callable[[], dict[str, nn.Module]]

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
        block = self._block_paths()[part.layer]  # a CapabilityError when they are not found
        plain = self._make_structural()
        if part.kind == "block":
            _set_submodule(plain, block, _RemovedBlock())
        else:
            sub, norm = ("attn", "ln1") if part.kind == "attention" else ("mlp", "ln2")
            path = self._hf_path(getattr(self.model.blocks[part.layer], sub))
            if path == block and part.kind == "mlp":  # no MLP module of its own (OPT): its two linear maps go
                _set_submodule(plain, self._paths()[f"blocks.{part.layer}.mlp.in"], _NoFeatures())
                _set_submodule(plain, self._paths()[f"blocks.{part.layer}.mlp.out"], _ZeroWrite(self.structure.d_model))
            else:
                _set_submodule(plain, path, _RemovedAttention() if part.kind == "attention" else _RemovedMLP())
            norm_path = self._paths().get(f"blocks.{part.layer}.{norm}")
            shared = self.structure.parallel and f"blocks.{part.layer}.ln2" not in self._paths()  # Phi: one norm
            if norm_path is not None and not shared:  # pre-norm: the LayerNorm only fed the removed sublayer
                _set_submodule(plain, norm_path, nn.Identity())
        self.refresh_structure(f"{part.kind} {part.layer}")
        self.weights_changed()

    def _heads_left(self, layer: int) -> list[int]:
        """Original indices of the attention heads layer `layer` still has."""
        if {f"block {layer}", f"attention {layer}"} & set(self.structure.removed):
            return []
        return self._heads.get(layer, list(range(self.structure.n_heads)))

    def _head_groups(self, layer: int) -> list[list[int]]:
        """The heads layer `layer` still has, grouped by the key/value head they share
        (one head per group without grouped-query attention): what can be removed together."""
        group = self.structure.n_heads // self._n_kv()
        groups: dict[int, list[int]] = {}
        for h in self._heads_left(layer):
            groups.setdefault(h // group, []).append(h)
        return list(groups.values())

    def _qkv_layout(self, layer: int) -> str | None:
        """How the fused query/key/value weight of layer `layer` (`blocks.{layer}.attn.qkv` in
        `linear_layers()`, [3 · heads · d_head, d_model]) stacks its rows: "blocks" ([all q;
        all k; all v], GPT-2's Conv1D c_attn), "per-head" ([q; k; v] of head 0, then of head
        1, ...: GPT-NeoX, BLOOM); None without a fused projection or with another layout."""
        module = self._linear_modules().get(f"blocks.{layer}.attn.qkv")
        if module is None:
            return None
        if _per_head_qkv(self.plain_model().get_submodule(self._hf_path(self.model.blocks[layer].attn))):
            return "per-head"
        return "blocks" if _out_dim(module) == 1 else None  # the layout remove_heads_ slices

    @torch.no_grad()
    def remove_heads_(self, layer: int, heads: Sequence[int]) -> None:
        """Cut heads out of layer `layer` of this private copy: their query, key and value
        rows and their output-projection columns go, so the layer computes fewer heads."""
        if {f"block {layer}", f"attention {layer}"} & set(self.structure.removed):
            raise RecipeError(f"The attention of layer {layer} is already removed from this copy.")
        left = self._heads_left(layer)
        gone = [h for h in heads if h not in left]
        if not 0 <= layer < self.structure.n_layers or gone:
            raise RecipeError(f"Layer {layer} has no head(s) {gone or list(heads)} to remove"
                              + (f" (its heads are {left})." if 0 <= layer < self.structure.n_layers else
                                 f"; the model has layers 0..{self.structure.n_layers - 1}."))
        keep = [i for i, h in enumerate(left) if h not in heads]  # positions in the current weights
        if not keep:
            self.remove_(_Part("attention", layer))
            return
        kv_left, group = self._kv_heads(layer), self.structure.n_heads // self._n_kv()
        kv_keep = [i for i, g in enumerate(kv_left) if any(left[k] // group == g for k in keep)]
        partial = sorted({h // group for h in heads} & {left[k] // group for k in keep})
        if partial:
            g = partial[0]
            raise CapabilityError(
                f"In this model's grouped-query attention every {group} query heads share one key/value head "
                f"(heads {g * group}–{(g + 1) * group - 1} share one), so a head goes only with its whole group: "
                f"remove heads {', '.join(str(h) for h in left if h // group == g)} together. To see what one "
                "head does, cut it on the Channels page (the weights stay).")
        plain = self._make_structural()
        attention = plain.get_submodule(self._hf_path(self.model.blocks[layer].attn))
        d_head = self.structure.d_head
        rows = _head_rows(keep, d_head)  # [kept * d_head]
        paths = {k: self._paths().get(f"blocks.{layer}.attn.{k}") for k in ("qkv", "q", "k", "v", "o")}
        if paths["qkv"] is not None:  # fused q, k, v (multi-head attention: kv_keep is keep)
            fused = plain.get_submodule(paths["qkv"])
            if _per_head_qkv(attention):  # GPT-NeoX: [q k v] of head 0, then of head 1, ...
                cols = _head_rows(keep, 3 * d_head)
            else:  # GPT-2's Conv1D: [q | k | v], each n * d_head wide
                cols = torch.cat([rows + j * len(left) * d_head for j in range(3)])
            _slice_(fused, cols, out_dim=_out_dim(fused))
            attention.split_size = len(rows)
        else:
            for k, index in (("q", rows), ("k", _head_rows(kv_keep, d_head)), ("v", _head_rows(kv_keep, d_head))):
                proj = plain.get_submodule(paths[k])
                _slice_(proj, index, out_dim=_out_dim(proj))
        out_proj = plain.get_submodule(paths["o"])
        _slice_(out_proj, rows, out_dim=1 - _out_dim(out_proj), bias=False)  # its inputs are the heads
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, len(keep))
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, len(kv_keep))
        self._kv[layer] = [kv_left[i] for i in kv_keep]
        self._heads[layer] = [left[i] for i in keep]
        self.refresh_structure(f"heads {', '.join(map(str, sorted(heads)))} of layer {layer}")
        self.weights_changed()

    def _n_kv(self) -> int:
        """Key/value heads per layer of the checkpoint (grouped-query attention: fewer than heads)."""
        return int(getattr(self.model.cfg, "n_key_value_heads", None) or self.structure.n_heads)

    def _kv_heads(self, layer: int) -> list[int]:
        """Original indices of the key/value heads layer `layer` still has."""
        return self._kv.get(layer, list(range(self._n_kv())))

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
            if callable(getattr(type(module), "dense", None)):  # a method, not a submodule named dense (GPT-NeoX)
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
        layer = next(l for l in self._heads if name.startswith(f"{self._block_paths()[l]}."))
        d_head, n, n_kv = self.structure.d_head, self.structure.n_heads, self._n_kv()
        attention = self.plain_model().get_submodule(self._hf_path(self.model.blocks[layer].attn))
        heads, kv = _head_rows(self._heads[layer], d_head), _head_rows(self._kv_heads(layer), d_head)
        for dim in range(dense.dim()):
            if dense.shape[dim] != kept.shape[dim]:
                if dense.shape[dim] == 3 * n * d_head:  # fused q, k, v
                    index = (_head_rows(self._heads[layer], 3 * d_head) if _per_head_qkv(attention)
                             else torch.cat([heads + j * n * d_head for j in range(3)]))
                else:
                    index = kv if dense.shape[dim] == n_kv * d_head and kept.shape[dim] == len(kv) else heads
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


def _head_rows(heads: Sequence[int], width: int) -> torch.Tensor:
    """The rows (or columns) of `heads` in a weight that holds `width` of them per head."""
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


def _per_head_qkv(attention: nn.Module) -> bool:
    """Whether a fused q/k/v projection is laid out head by head ([q k v] of head 0, then
    head 1, ...), as GPT-NeoX and BLOOM do, rather than [all q | all k | all v]."""
    return type(attention).__name__.startswith(("GPTNeoX", "Bloom"))


class _NoFeatures(nn.Module):
    """A removed MLP's first linear map, where the MLP is no module of its own: no features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class _ZeroWrite(nn.Module):
    """A removed MLP's last linear map: it writes nothing to the residual stream."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)


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


def _zero(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(tensor)
