"""One interface over TransformerLens bridges (language models) and plain torch
image models. Pages and analyses talk to a `ModelHandle`, never to a backend.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lib.hooks import record_outputs

KINDS = ("causal-lm", "image-classifier", "image-to-image")


@dataclass(frozen=True)
class Structure:
    """Layer structure. For LMs the transformer shape; for image models the stages.

    stages: for image models, (name, description) per stage in forward order.
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


class ModelHandle(ABC):
    """A loaded model with what every view needs to know about it.

    kind: "causal-lm" | "image-classifier" | "image-to-image".
    lock: one base model serves every browser session (Streamlit runs each in its own
    thread), and hooks act on every forward through the module, so each use of the
    model (a forward, a readout, a whole `with hooks(...)` block) holds this
    re-entrant lock: one session's hooks never touch another session's forward.
    """

    spec: str
    kind: str
    model: nn.Module
    tokenizer: Any | None
    structure: Structure
    eval_task: str = "text"  # "text" | "repeated-tokens" | "digits" | "noisy-digits"

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @property
    def n_params(self) -> int:
        """Distinct parameters (tied weights once; buffers not counted)."""
        return sum(p.numel() for p in _distinct(iter(self.model.named_parameters())).values())

    @property
    def size_bits(self) -> int:
        """Bits needed to store the weights as they are stored (see `storage_bits`)."""
        return sum(p.numel() * p.element_size() * 8 for p in self.weights().values())

    @property
    def fingerprint(self) -> str:
        """Hash of the weights at load time: the cache key of every analysis."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self.current_fingerprint()
        return self._fingerprint

    def current_fingerprint(self) -> str:
        """Hash of the weights now; equal to `fingerprint` while nothing mutated them."""
        return weight_fingerprint(iter(self.weights().items()))

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """Every distinct parameter and buffer tensor by name (tied weights once)."""

    @abstractmethod
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model output without gradients. LM: tokens [batch, pos] -> logits
        [batch, pos, vocab]; image models: [batch, 1, H, W] -> logits or images."""

    @abstractmethod
    def run_with_cache(
        self, inputs: torch.Tensor, names: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward that also records the named activations (hook names for LMs,
        stage names for image models)."""

    def describe(self) -> list[tuple[str, str]]:
        """(property, value) rows for a model card."""
        s = self.structure
        rows = [("kind", self.kind), ("architecture", s.architecture), ("layers", str(s.n_layers))]
        if self.kind == "causal-lm":
            rows += [("heads", str(s.n_heads)), ("d_model", str(s.d_model)), ("d_head", str(s.d_head)),
                     ("d_mlp", str(s.d_mlp)), ("vocabulary", str(s.d_vocab)), ("context", str(s.n_ctx))]
        else:
            rows += [("stages", ", ".join(n for n, _ in s.stages))]
        rows += [("parameters", f"{self.n_params:,}"), ("size", f"{self.size_bits / 8 / 2**20:.2f} MiB"),
                 ("fingerprint", self.fingerprint)]
        return rows


def _distinct(named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, t in named:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t
    return out


class _Recorded(Exception):
    """Raised inside a hook to end a forward once every wanted activation is recorded."""


class BridgeHandle(ModelHandle):
    """A causal LM behind a TransformerLens `TransformerBridge`."""

    kind = "causal-lm"

    def __init__(self, spec: str, bridge: Any) -> None:
        super().__init__()
        self.spec = spec
        self.model = bridge
        self.tokenizer = bridge.tokenizer
        cfg = bridge.cfg
        self.structure = Structure(
            architecture=str(getattr(cfg, "architecture", None) or type(bridge.original_model).__name__),
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=int(getattr(cfg, "d_mlp", 0) or 0), d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        )
        self.eval_task = getattr(bridge.original_model.config, "layerscope_eval", "text")

    @property
    def hf_model(self) -> nn.Module:
        return self.model.original_model

    def weights(self) -> dict[str, torch.Tensor]:
        named = list(self.hf_model.named_parameters()) + list(self.hf_model.named_buffers())
        return _distinct(iter((n, t) for n, t in named if t.is_floating_point()))

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs, prepend_bos=False)

    @exclusive
    @torch.no_grad()
    def run_with_cache(self, inputs, names):
        wanted = set(names)
        logits, cache = self.model.run_with_cache(
            inputs, prepend_bos=False, names_filter=lambda n: n in wanted
        )
        return logits, {n: cache[n] for n in names if n in cache}

    @exclusive
    @torch.no_grad()
    def record(self, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The activations at hook `names` (each [batch, pos, ...]) from a forward that
        stops as soon as all of them have fired: layers after the last one and the
        unembedding are not run. Names that never fire are missing from the result."""
        wanted, cache = set(names), {}

        def keep(name: str) -> Callable:
            def hook(tensor: torch.Tensor, hook: Any) -> None:
                cache[name] = tensor
                if len(cache) == len(wanted):
                    raise _Recorded

            return hook

        try:
            with self.hooks([(n, keep(n)) for n in wanted]):
                self.model(inputs, prepend_bos=False)
        except _Recorded:
            pass
        return {n: cache[n] for n in names if n in cache}

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
        """TransformerLens hooks by name, removed on exit (also on error)."""
        with self.lock, self.model.hooks(fwd_hooks=list(fwd_hooks)):
            yield

    @exclusive
    @torch.no_grad()
    def run_block(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Block `layer` alone: resid_pre [batch, pos, d_model] -> resid_post."""
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
        expected = self.readout(probe).float()
        got = nn.functional.linear(self.final_norm(probe), weight, b_u).float()
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
            return None
        return weight, b_u


class TorchHandle(ModelHandle):
    """A plain torch image model made of named stages (`model.stages`)."""

    def __init__(self, spec: str, model: nn.Module, kind: str, architecture: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval()
        self.kind = kind
        self.tokenizer = None
        self.eval_task = "digits" if kind == "image-classifier" else "noisy-digits"
        stages = tuple((name, _describe_stage(m)) for name, m in model.stages.items())
        self.structure = Structure(architecture=architecture, n_layers=len(stages), stages=stages)

    def weights(self) -> dict[str, torch.Tensor]:
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return _distinct(iter(named))

    @exclusive
    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    @exclusive
    @torch.no_grad()
    def run_with_cache(self, inputs, names):
        modules = {n: self.model.stages[n] for n in names}
        with record_outputs(modules) as store:
            out = self.model(inputs)
        return out, dict(store)


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
        else:
            words.append(type(p).__name__)
    return " + ".join(words)
