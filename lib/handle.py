"""The one interface to a model. Pages and analyses talk to a `ModelHandle`, never to a
backend: activation points are named by `Point`, weights by readable names
(`blocks.3.mlp.in`), and a capability a backend lacks raises `CapabilityError` from the
handle. The handle is a small core (forward, hooks and records at `Point`s, weights and
linear layers, private copies, structure, fingerprint) plus capability objects for what
only some views need (`blocks`, `heads`, `gates`; `lib.capabilities`). Two backends
implement it: `lib.lm_handle.BridgeHandle` (language models behind TransformerLens; its
structural edits in `lib.lm_parts`, its capabilities in `lib.lm_capabilities`) and
`lib.image_handle.TorchHandle` (plain torch image models).
`lib.handle_layers` gives both the linear layers by readable name; `lib.storage` says how
tensors are stored and identified. Nothing outside lib/ knows which backend it has.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import threading
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from lib.capabilities import Blocks, FrozenGates, Heads, LinearRegions
from lib.devices import check_copy
from lib.errors import CapabilityError, DataError, RecipeError
from lib.handle_layers import InputTransform, LinearLayers
from lib.locks import exclusive
from lib.points import KINDS, LM_PARTS, ActivationHook, Caught, Part, Point, Structure  # noqa: F401  (re-exported)
from lib.storage import StoredAs, lazy_copy_memo, weight_fingerprint


def check_handle(handle: object) -> None:
    """Refuse anything but a loaded model (`lib.models.load_model`) where one is needed."""
    if not isinstance(handle, ModelHandle):
        raise DataError(f"The model must be a ModelHandle from lib.models.load_model(...), not a "
                        f"{type(handle).__name__} value.")


class _Recorded(Exception):
    """Raised inside a hook to end a forward once every wanted activation is recorded."""


class ModelHandle(LinearLayers, ABC):
    """A loaded model with what every view needs to know about it.

    kind: "causal-lm" | "image-classifier" | "image-to-image".
    lock: one base model serves every browser session (Streamlit runs each in its own
    thread), and hooks act on every forward through the module, so each use of the
    model (a forward, a readout, a whole `with hooks(...)` block, a copy) holds this
    re-entrant lock: one session's hooks never touch another session's forward.
    storage: readable tensor name -> `StoredAs`, for tensors not stored as plain floats.
    base_fingerprint: for a private copy, the fingerprint of the model it was copied from.
    input_transforms: linear layer name -> a transform of its input that is part of this
    edited copy's definition (activation quantization); always empty on a base model.
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
        self.input_transforms: dict[str, InputTransform] = {}
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
        """Hash of the weights now; equal to `fingerprint` while nothing mutated them. A copy
        with input transforms or an exit rule computes another function with the same weights,
        so their descriptions (reprs) are hashed in too."""
        with self.lock:
            digest = weight_fingerprint(iter(self.weights().items()))
        if self.input_transforms:  # of the layers still there (a removed layer's transform does nothing)
            live = self._linear_modules()
            text = digest + repr(sorted((name, repr(fn)) for name, fn in self.input_transforms.items() if name in live))
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        if self.exit_rule is not None:
            digest = hashlib.sha256(f"{digest} exits {self.exit_rule!r}".encode()).hexdigest()[:16]
        return digest

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

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model output without gradients. LM: tokens [batch, pos] -> logits
        [batch, pos, vocab]; image models: [batch, 1, H, W] -> logits or images. On a
        private copy with an exit rule (an early-exit edit), each token's or image's output
        is the one the rule reads out at its exit layer instead."""
        inputs = self.check_inputs(inputs)
        if self.exit_rule is None:
            return self._forward_every_layer(inputs)
        states, outputs = self.exit_states(inputs)
        return self.exit_rule(self, states, outputs)

    def outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """What `forward` gives, for scoring (`lib.metrics.metrics_from_outputs`): a language
        model's logits that would be large come back as a `lib.scoring.ReadLogits`, read out a
        chunk at a time as they are scored, so the memory does not grow with vocabulary x tokens."""
        return self.forward(inputs)

    def outputs_recording(self, inputs: torch.Tensor, points: Sequence[Point]) -> tuple[Any, dict] | None:
        """`outputs(inputs)` and the residual stream at `points` (resid_pre / resid_mid /
        resid_post) from that same forward, the outputs unchanged by the recording; None where
        this model cannot record them in its own forward (then `outputs` and `record` are two
        passes). One pass then feeds the baseline and every per-layer statistic."""
        return None

    @abstractmethod
    def _forward_every_layer(self, inputs: torch.Tensor) -> torch.Tensor:
        """`forward` through every layer, no exit rule applied."""

    def check_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs` as the model reads them, or a DataError saying why it cannot (each
        backend knows its limits: token ids and context length, image dtypes)."""
        return inputs

    def check_point(self, point: Point) -> None:
        """Raise CapabilityError if this model has no such activation point."""
        if point.site not in self.sites:
            raise CapabilityError(f"A {self.kind} model has no '{point.site}' activations "
                                  f"(it has: {', '.join(self.sites)}).")

    @abstractmethod
    def hooks(self, pairs: Sequence[tuple[Point, ActivationHook]]) -> Any:
        """Context manager: `fn(activation)` runs at each point (its return value, if not
        None, replaces the activation); all hooks go on exit, also when the body raises."""

    @contextlib.contextmanager
    def told_of_blocks(self, told: Caught) -> Iterator[None]:
        """Inside, a forward tells `told(k, n)` as its k-th of n blocks finishes, for a bar
        over one long forward: nothing is recorded and the forward takes its usual path.
        Models without transformer blocks tell nothing."""
        yield

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
    def record(self, inputs: torch.Tensor, points: Sequence[Point],
               caught: Caught | None = None) -> dict[Point, torch.Tensor]:
        """The activations at `points` from a forward that stops as soon as all of them
        have fired: later layers and the readout are not run. Points that never fire are
        missing from the result. `caught` is told of each point as it is caught."""
        wanted, cache = set(points), {}

        def keep(point: Point) -> ActivationHook:
            def hook(tensor: torch.Tensor) -> None:
                cache[point] = tensor
                if caught is not None:
                    caught(len(cache), len(wanted))
                if len(cache) == len(wanted):
                    raise _Recorded

            return hook

        try:
            with self.hooks([(p, keep(p)) for p in wanted]):
                self.forward(inputs)
        except _Recorded:
            pass
        return {p: cache[p] for p in points if p in cache}

    # ------------------------------------------------------------------ capabilities (lib.capabilities)

    @property
    def blocks(self) -> Blocks:
        """Blocks run one at a time and the readout (logit lens, drop sweep, early exits)."""
        raise CapabilityError(f"A {self.kind} model has no transformer blocks and no vocabulary readout.")

    @property
    def heads(self) -> Heads:
        """Each attention head's weights in circuit form (Channels)."""
        raise CapabilityError(f"A {self.kind} model has no attention heads.")

    @property
    def gates(self) -> FrozenGates | LinearRegions:
        """The model with its nonlinearities frozen (Interpreter)."""
        raise CapabilityError(f"A {self.kind} model cannot be made linear by freezing its gates.")

    # ------------------------------------------------------------------ drops

    @abstractmethod
    def drop_problem(self, part: Part) -> str | None:
        """Why `part` cannot be dropped from this model (None if it can)."""

    def check_parts(self, parts: Sequence[Part]) -> None:  # a RecipeError for the first part it cannot drop
        for part in parts:
            if not isinstance(getattr(part, "kind", None), str) or not hasattr(part, "layer"):
                raise RecipeError(f"A part to drop is a Drop(kind, layer), e.g. Drop('mlp', 1), not {part!r}."[:200])
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

    @abstractmethod
    def save_pretrained(self, folder: Any) -> None:
        """Write the model as a checkpoint folder that `lib.models.load_model` loads back
        with the same outputs (and, for LMs, plain transformers too)."""

    # ------------------------------------------------------------------ copies

    def private_copy(self, dtype: torch.dtype | None = None, requires_grad: bool = False) -> "ModelHandle":
        """A copy of this model that edits, gradients and float64 can never leak from. Taken
        under this handle's lock (no other session's hooks are on the model then); the copy
        has its own lock, no hooks, its own fingerprint (equal to this one until the copy is
        edited), optionally gradients and another dtype; the tokenizer is shared (never mutated).
        In the same dtype the copy shares each tensor's memory with this model until an edit
        writes it, so only what an edit rewrites costs memory."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise RecipeError(f"A copy of the model can only be made in a floating-point dtype (torch.float32, "
                              f"torch.float64, torch.float16 or torch.bfloat16), not {dtype}. To store weights "
                              "in fewer bits, quantize them (Lab page, Quantize) instead.")
        check_copy(sum(p.numel() * (dtype or p.dtype).itemsize for p in self.model.parameters()))
        with self.lock:
            new = copy.deepcopy(self, self._copy_memo())
        new._strip_hooks()
        if new.input_transforms:  # part of the copy's definition: kept, on the copy's own modules
            new._wire_input_transforms()
        if dtype is not None:
            new.model.to(dtype)  # refused above for a dtype that is not floating point
        for p in new.model.parameters():
            p.requires_grad_(requires_grad)
        new.base_fingerprint = self.base_fingerprint or self.fingerprint
        new.weights_changed()
        return new

    def _copy_memo(self) -> dict[int, Any]:
        """The deep copy's memo, seeded: every tensor copied lazily (shared until written),
        views kept views, the tokenizer shared."""
        memo: dict[int, Any] = lazy_copy_memo(self.model)
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
                 ("runs on", f"{self.device.type} · {str(self.dtype).replace('torch.', '')}"),
                 ("fingerprint", self.fingerprint)]
        return rows

    @property
    def device(self) -> torch.device:
        """Where the weights are (the first device, for a model spread over several)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the weights (the first floating-point parameter's)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    # ---- early exits

    # A private copy's early-exit rule: `forward` returns `exit_rule(handle, *exit_states(inputs))`.
    # None (always on a base model): forward is unchanged. `private_copy()` keeps it with what it
    # holds (tuned-lens translators, exit heads); its repr enters the fingerprint.
    exit_rule: Callable[["ModelHandle", list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None

    def set_exit_rule_(self, rule: Callable[["ModelHandle", list[torch.Tensor], torch.Tensor], torch.Tensor] | None
                       ) -> None:
        """Give this private copy an output rule (None takes it away); never a base model."""
        if self.base_fingerprint is None:
            raise RecipeError("Early exits are set on a private copy (`handle.private_copy()`), "
                              "never on a loaded base model.")
        self.exit_rule = rule
        self.weights_changed()  # the rule enters the fingerprint: caches keyed by it must not mix the two

    def exit_states(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What an early exit reads, from one forward through every layer (the exit rule not
        applied): the input of every layer l = 0..n_layers-1 (LMs: the residual stream entering
        block l, [batch, pos, d_model]; image models: the input of stage l, the images first)
        and the model's own output (logits [batch, pos, vocab] or [batch, classes])."""
        raise CapabilityError(f"A {self.kind} model cannot exit early.")


def _keeper(cache: dict, point: Point) -> ActivationHook:
    def hook(tensor: torch.Tensor) -> None:
        cache[point] = tensor

    return hook
