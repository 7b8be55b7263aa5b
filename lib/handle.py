"""One interface over TransformerLens bridges (language models) and plain torch image
models. Pages and analyses talk to a `ModelHandle`, never to a backend: activation
points are named by `Point`, weights by readable names (`blocks.3.mlp.in`), and a
capability a backend lacks raises `CapabilityError` from here.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError, RecipeError
from lib.hooks import count_hooks, forward_hooks, forward_pre_hooks

KINDS = ("causal-lm", "image-classifier", "image-to-image")
LM_PARTS = ("block", "attention", "mlp")

# An activation hook: gets the activation, returns a replacement or None (keep it).
ActivationHook = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Point:
    """A named activation point.

    site: LMs "resid_pre" (x_l, entering block l) | "resid_mid" (m_l, after attention) |
    "resid_post" (y_l) | "attn_out" | "mlp_out" | "pattern" (attention pattern
    [batch, head, query, key]) | "z" (each head's output before the output projection,
    [batch, pos, head, d_head]); image models "stage" (a stage's output).
    layer: block index (LMs) or stage name (image models).
    """

    site: str
    layer: int | str


class Part(Protocol):
    """A droppable part: kind "block" | "attention" | "mlp" (layer index) or "stage"
    (stage name). `analysis.pruning.Drop` is one."""

    kind: str
    layer: int | str


@dataclass(frozen=True)
class Structure:
    """Layer structure. For LMs the transformer shape; for image models the stages.

    stages: for image models, (name, description) per stage in forward order.
    removed: labels of parts removed from this (edited) copy, e.g. "attention 3".
    """

    architecture: str
    n_layers: int
    n_heads: int = 0
    d_model: int = 0
    d_head: int = 0
    d_mlp: int = 0
    d_vocab: int = 0
    n_ctx: int = 0
    stages: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredAs:
    """How one weight tensor is stored when it is not the plain float tensor in memory:
    `bits` in total (codes + scales + zero points for a quantized tensor, 0 for a
    removed one) and a short description ("int4 g128", "removed")."""

    bits: int
    format: str

    @property
    def removed(self) -> bool:
        return self.format == "removed"


def quantized_bits(numel: int, code_bits: int, n_groups: int, scale_bits: int = 16, zero_bits: int = 0) -> int:
    """Storage of a quantized tensor: a code per element plus a scale (and a zero point,
    for asymmetric formats) per group."""
    return numel * code_bits + n_groups * (scale_bits + zero_bits)


def weight_fingerprint(tensors: Iterator[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of every tensor, in name order.
    Equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def exclusive(method: Callable) -> Callable:
    """Run a handle method holding the handle's lock (see `ModelHandle.lock`)."""

    @functools.wraps(method)
    def locked(self: "ModelHandle", *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class _Recorded(Exception):
    """Raised inside a hook to end a forward once every wanted activation is recorded."""


class ModelHandle(ABC):
    """A loaded model with what every view needs to know about it.

    kind: "causal-lm" | "image-classifier" | "image-to-image".
    lock: one base model serves every browser session (Streamlit runs each in its own
    thread), and hooks act on every forward through the module, so each use of the
    model (a forward, a readout, a whole `with hooks(...)` block, a copy) holds this
    re-entrant lock: one session's hooks never touch another session's forward.
    storage: readable tensor name -> `StoredAs`, for tensors not stored as plain floats.
    base_fingerprint: for a private copy, the fingerprint of the model it was copied from.
    """

    spec: str
    kind: str
    model: nn.Module
    tokenizer: Any | None
    structure: Structure
    eval_task: str = "text"  # "text" | "repeated-tokens" | "digits" | "noisy-digits"
    sites: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.storage: dict[str, StoredAs] = {}
        self.base_fingerprint: str | None = None
        self._fingerprint: str | None = None

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ identity, size

    @property
    def fingerprint(self) -> str:
        """Hash of the weights (memoised): the cache key of every analysis. Edits to a
        private copy call `weights_changed()`, so it is recomputed, never inherited."""
        if self._fingerprint is None:
            self._fingerprint = self.current_fingerprint()
        return self._fingerprint

    def current_fingerprint(self) -> str:
        """Hash of the weights now; equal to `fingerprint` while nothing mutated them."""
        with self.lock:
            return weight_fingerprint(iter(self.weights().items()))

    def weights_changed(self) -> None:
        """Forget the memoised fingerprint (call after editing a private copy)."""
        self._fingerprint = None

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """Every distinct tensor the forward reads, by readable name (tied weights once)."""

    @abstractmethod
    def linear_layers(self) -> dict[str, torch.Tensor]:
        """Every linear map by readable name (`blocks.3.mlp.in`, `conv2`) -> its weight as
        [out, in, ...] (a view: editing it in place edits the model). Pruning and
        quantization iterate this."""

    @property
    def n_params(self) -> int:
        """Distinct parameters kept (tied weights once; buffers and removed tensors not counted)."""
        return sum(t.numel() for name, t in self.weights().items()
                   if isinstance(t, nn.Parameter) and not (name in self.storage and self.storage[name].removed))

    @property
    def size_bits(self) -> int:
        """Bits to store the weights as they are stored: plain tensors at their dtype's
        width, quantized ones as codes + scales + zero points, removed ones as nothing."""
        return sum(self.storage[name].bits if name in self.storage else t.numel() * t.element_size() * 8
                   for name, t in self.weights().items())

    # ------------------------------------------------------------------ running

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model output without gradients. LM: tokens [batch, pos] -> logits
        [batch, pos, vocab]; image models: [batch, 1, H, W] -> logits or images."""

    def check_point(self, point: Point) -> None:
        """Raise CapabilityError if this model has no such activation point."""
        if point.site not in self.sites:
            raise CapabilityError(f"A {self.kind} model has no '{point.site}' activations "
                                  f"(it has: {', '.join(self.sites)}).")

    @abstractmethod
    def hooks(self, pairs: Sequence[tuple[Point, ActivationHook]]) -> Any:
        """Context manager: `fn(activation)` runs at each point (its return value, if not
        None, replaces the activation); all hooks go on exit, also when the body raises."""

    @exclusive
    @torch.no_grad()
    def run_with_cache(self, inputs: torch.Tensor, points: Sequence[Point]
                       ) -> tuple[torch.Tensor, dict[Point, torch.Tensor]]:
        """Forward that also records the activations at `points`."""
        cache: dict[Point, torch.Tensor] = {}
        with self.hooks([(p, _keeper(cache, p)) for p in points]):
            out = self.forward(inputs)
        return out, cache

    @exclusive
    @torch.no_grad()
    def record(self, inputs: torch.Tensor, points: Sequence[Point]) -> dict[Point, torch.Tensor]:
        """The activations at `points` from a forward that stops as soon as all of them
        have fired: later layers and the readout are not run. Points that never fire are
        missing from the result."""
        wanted, cache = set(points), {}

        def keep(point: Point) -> ActivationHook:
            def hook(tensor: torch.Tensor) -> None:
                cache[point] = tensor
                if len(cache) == len(wanted):
                    raise _Recorded

            return hook

        try:
            with self.hooks([(p, keep(p)) for p in wanted]):
                self.forward(inputs)
        except _Recorded:
            pass
        return {p: cache[p] for p in points if p in cache}

    def run_block(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"A {self.kind} model has no transformer blocks to run one by one.")

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"A {self.kind} model has no vocabulary readout.")

    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"A {self.kind} model has no final LayerNorm.")

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        raise CapabilityError(f"A {self.kind} model has no unembedding.")

    # ------------------------------------------------------------------ drops

    @abstractmethod
    def drop_problem(self, part: Part) -> str | None:
        """Why `part` cannot be dropped from this model (None if it can)."""

    def check_parts(self, parts: Sequence[Part]) -> None:
        for part in parts:
            reason = self.drop_problem(part)
            if reason:
                raise RecipeError(reason)

    @abstractmethod
    def dropping(self, parts: Sequence[Part]) -> Any:
        """Context manager: inside, the model runs with `parts` contributing nothing
        (hooks, always removed on exit; the weights are untouched)."""

    @abstractmethod
    def remove_(self, part: Part) -> None:
        """Remove `part` from this private copy for good (never on a base model)."""

    def remove_heads_(self, layer: int, heads: Sequence[int]) -> None:
        """Cut attention heads out of one layer of this private copy."""
        raise CapabilityError(f"A {self.kind} model has no attention heads.")

    def place(self, name: str) -> tuple[int | str | None, str | None]:
        """Where a readable weight name sits: (block index or stage name, "attention" |
        "mlp" | None). `blocks.3.mlp.in` -> (3, "mlp"); `conv2` -> ("conv2", None);
        `unembed` -> (None, None)."""
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
            return int(parts[1]), {"attn": "attention", "mlp": "mlp"}.get(parts[2])
        if self.kind != "causal-lm":
            return parts[0], None
        return None, None

    @abstractmethod
    def _linear_modules(self) -> dict[str, nn.Module]:
        """Readable name -> module, for the layers `linear_layers()` lists."""

    @exclusive
    @torch.no_grad()
    def input_norms(self, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """||X_j||_2 over every position of `inputs` for each input column j of the linear
        layers `names` (Wanda's activation statistic): [in] per layer ([in * kh * kw] for a
        convolution, matching its weight viewed as [out, in * kh * kw])."""
        modules = self._linear_modules()
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise CapabilityError(f"The model has no linear layer(s) {', '.join(unknown[:3])}.")
        sums: dict[str, torch.Tensor] = {}

        def keep(name: str, module: nn.Module) -> Callable:
            def pre_hook(_m: nn.Module, args: tuple) -> None:
                x = args[0].float()
                if isinstance(module, nn.Conv2d):  # columns of the im2col matrix: [b, in*kh*kw, positions]
                    x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                    x = x.transpose(1, 2)
                x = x.reshape(-1, x.shape[-1])  # [positions, in]
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

            return pre_hook

        with forward_pre_hooks([(modules[n], keep(n, modules[n])) for n in names]):
            self._forward_weights_only(inputs)
        return {n: sums[n].sqrt() for n in names}

    @abstractmethod
    def _forward_weights_only(self, inputs: torch.Tensor) -> torch.Tensor:
        """A forward through the modules `_linear_modules()` returns (no TransformerLens hooks)."""

    # ------------------------------------------------------------------ copies

    def private_copy(self, dtype: torch.dtype | None = None, requires_grad: bool = False) -> "ModelHandle":
        """A copy of this model that edits, gradients and float64 can never leak from.

        Taken under this handle's lock (so no other session's hooks are on the model
        at that moment); the copy has its own lock, no hooks, its own fingerprint
        (recomputed, equal to this one until the copy is edited), and optionally
        gradients and another dtype. The tokenizer is shared (it is never mutated).
        """
        with self.lock:
            new = copy.deepcopy(self, self._copy_memo())
        new._strip_hooks()
        if dtype is not None:
            new.model.to(dtype)
        for p in new.model.parameters():
            p.requires_grad_(requires_grad)
        new.base_fingerprint = self.base_fingerprint or self.fingerprint
        new.weights_changed()
        return new

    def _copy_memo(self) -> dict[int, Any]:
        """The deep copy's memo, seeded: views stay views, the tokenizer is shared."""
        memo: dict[int, Any] = _shared_storage_memo(self.model)
        if self.tokenizer is not None:
            memo[id(self.tokenizer)] = self.tokenizer
        return memo

    @abstractmethod
    def _strip_hooks(self) -> None:
        """Remove every hook from this (freshly copied) model."""

    def refresh_structure(self, removed: str | None = None) -> None:
        """Record a structural edit in `structure` (shown on the model card)."""
        if removed:
            self.structure = replace(self.structure, removed=self.structure.removed + (removed,))

    def describe(self) -> list[tuple[str, str]]:
        """(property, value) rows for a model card."""
        s = self.structure
        rows = [("kind", self.kind), ("architecture", s.architecture), ("layers", str(s.n_layers))]
        if self.kind == "causal-lm":
            rows += [("heads", str(s.n_heads)), ("d_model", str(s.d_model)), ("d_head", str(s.d_head))]
            if s.d_mlp:
                rows.append(("d_mlp", str(s.d_mlp)))
            rows += [("vocabulary", str(s.d_vocab)), ("context", str(s.n_ctx))]
        else:
            rows += [("stages", ", ".join(n for n, _ in s.stages))]
        if s.removed:
            rows.append(("removed", ", ".join(s.removed)))
        rows += [("parameters", f"{self.n_params:,}"), ("size", f"{self.size_bits / 8 / 2**20:.2f} MiB"),
                 ("fingerprint", self.fingerprint)]
        return rows


def _shared_storage_memo(model: nn.Module) -> dict[int, torch.Tensor]:
    """Copies, made in advance, of the tensors that share storage with another tensor.

    `copy.deepcopy` clones each parameter on its own, so tensors that are views of one
    storage would come apart in the copy (TransformerLens splits GPT-2's fused qkv
    weight into q, k and v views; the fast path reads the fused one). Seeding the deep
    copy's memo with views of one cloned storage keeps them views.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    memo: dict[int, torch.Tensor] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        storage = group[0].untyped_storage().clone()
        for t in group:
            view = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
            memo[id(t)] = nn.Parameter(view, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else view
    return memo


def _keeper(cache: dict, point: Point) -> ActivationHook:
    def hook(tensor: torch.Tensor) -> None:
        cache[point] = tensor

    return hook


def _distinct(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _zero(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(tensor)


# ====================================================================== LM backend


_STASHED = ("_pattern", "_captured_pre_ln_residual")  # what TransformerLens keeps of the last forward


class BridgeHandle(ModelHandle):
    """A causal LM behind a TransformerLens `TransformerBridge`."""

    kind = "causal-lm"
    sites = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "z")
    _HOOKS = {  # the one place TransformerLens hook names are spelled
        "resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
        "resid_post": "blocks.{}.hook_resid_post", "attn_out": "blocks.{}.hook_attn_out",
        "mlp_out": "blocks.{}.hook_mlp_out", "pattern": "blocks.{}.attn.hook_pattern",
        "z": "blocks.{}.attn.hook_z",
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
                if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
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
            if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
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
        if self._structural:
            raise CapabilityError(f"This edited copy has parts removed ({', '.join(self.structure.removed)}), "
                                  f"so {what} is not available on it; use the base model or a copy with "
                                  "weight edits only.")

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
        return self._heads.get(layer, list(range(self.structure.n_heads)))

    @torch.no_grad()
    def remove_heads_(self, layer: int, heads: Sequence[int]) -> None:
        """Cut heads out of layer `layer` of this private copy: their query, key and value
        rows and their output-projection columns go, so the layer computes fewer heads."""
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


# ====================================================================== image backend


class TorchHandle(ModelHandle):
    """A plain torch image model made of named stages (`model.stages`)."""

    sites = ("stage",)

    def __init__(self, spec: str, model: nn.Module, kind: str, architecture: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        self.kind = kind
        self.tokenizer = None
        self.eval_task = "digits" if kind == "image-classifier" else "noisy-digits"
        self.structure = Structure(architecture=architecture, n_layers=len(model.stages),
                                   stages=self._stage_rows())

    def _stage_rows(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, _describe_stage(m)) for name, m in self.model.stages.items())

    @property
    def stage_names(self) -> list[str]:
        return list(self.model.stages)

    def weights(self) -> dict[str, torch.Tensor]:
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return _distinct(iter((n.removeprefix("stages."), t) for n, t in named))

    def _linear_modules(self) -> dict[str, nn.Module]:
        found = {name.removeprefix("stages."): m for name, m in self.model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))}
        # a one-layer stage is named by its stage ("conv1"), not "conv1.0"
        return {k.removesuffix(".0") if f"{k.removesuffix('.0')}.1" not in found else k: m for k, m in found.items()}

    def linear_layers(self) -> dict[str, torch.Tensor]:
        # a transposed convolution stores [in, out, kh, kw]
        return {k: m.weight.transpose(0, 1) if isinstance(m, nn.ConvTranspose2d) else m.weight
                for k, m in self._linear_modules().items()}

    def _forward_weights_only(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def _stage(self, point: Point) -> nn.Module:
        self.check_point(point)
        if point.layer not in self.model.stages:
            raise CapabilityError(f"The model has no stage {point.layer!r}; its stages are "
                                  f"{', '.join(self.model.stages)}.")
        return self.model.stages[point.layer]

    @contextmanager
    def hooks(self, pairs: Sequence[tuple[Point, ActivationHook]]) -> Iterator[None]:
        modules = [(self._stage(p), _torch_hook(fn)) for p, fn in pairs]
        with self.lock, forward_hooks(modules):
            yield

    @exclusive
    @torch.no_grad()
    def stage_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Input and output shape (without batch) of every stage, from one probe image."""
        x = torch.zeros(1, 1, 8, 8, dtype=next(self.model.parameters()).dtype)
        shapes = {}
        for name, stage in self.model.stages.items():
            y = stage(x)
            shapes[name] = (tuple(x.shape[1:]), tuple(y.shape[1:]))
            x = y
        return shapes

    def drop_problem(self, part: Part) -> str | None:
        if part.kind != "stage":
            return f"An image model's parts are its stages; {part.kind!r} is not one."
        if part.layer not in self.model.stages:
            return f"The model has no stage {part.layer!r}; its stages are {', '.join(self.model.stages)}."
        before, after = self.stage_shapes()[part.layer]
        if before != after:
            return (f"Stage {part.layer} maps shape {before} to {after}, so it cannot be bypassed: "
                    "removing it would break the next stage.")
        return None

    @contextmanager
    def dropping(self, parts: Sequence[Part]) -> Iterator[None]:
        self.check_parts(parts)
        pairs = [(self.model.stages[p.layer], lambda mod, inp, out: inp[0]) for p in parts]
        with self.lock, forward_hooks(pairs):
            yield

    def remove_(self, part: Part) -> None:
        """Replace the stage by the identity (really removed: its weights are gone)."""
        self.check_parts([part])
        self.model.stages[part.layer] = nn.Identity()
        self.structure = replace(self.structure, stages=self._stage_rows())
        self.refresh_structure(f"stage {part.layer}")
        self.weights_changed()

    def _strip_hooks(self) -> None:
        for module in self.model.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._backward_hooks.clear()


def _torch_hook(fn: ActivationHook) -> Callable:
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return fn(output)

    return hook


def _describe_stage(m: nn.Module) -> str:
    parts = [m] if not isinstance(m, nn.Sequential) else list(m)
    words = []
    for p in parts:
        if isinstance(p, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "conv" if isinstance(p, nn.Conv2d) else "transposed conv"
            stride = f" s{p.stride[0]}" if p.stride[0] > 1 else ""
            words.append(f"{kind} {p.in_channels}->{p.out_channels} k{p.kernel_size[0]}{stride}")
        elif isinstance(p, nn.Linear):
            words.append(f"linear {p.in_features}->{p.out_features}")
        elif isinstance(p, nn.Identity):
            words.append("removed (identity)")
        else:
            words.append(type(p).__name__)
    return " + ".join(words)
