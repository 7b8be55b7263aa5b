"""Recording a language model's activations through its plain transformers model instead
of the TransformerLens bridge, where nothing hooks or edits the forward: faster (SDPA
attention) and lighter (no pattern of every layer computed and kept on the side). Each
is checked against the bridge's own hooks in the tests, on every supported family."""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError
from lib.lm_capabilities import _Stop
from lib.points import Caught, Point
from lib.progress import set_in_thread

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")  # what the plain model gives by torch hooks


class RecordBackend(Protocol):
    """What these read of their handle; `lib.lm_handle.BridgeHandle` defines each."""

    model: Any  # the TransformerBridge
    lock: Any  # the handle's RLock

    def plain_model(self) -> nn.Module: ...
    def check_inputs(self, inputs: torch.Tensor) -> torch.Tensor: ...
    def hook_name(self, point: Point) -> str: ...
    def _block_paths(self) -> list[str]: ...
    def _hf_path(self, wrapper: nn.Module) -> str | None: ...
    def _heads_left(self, layer: int) -> list[int]: ...


def all_patterns(h: RecordBackend, inputs: torch.Tensor, points: Sequence[Point]) -> dict[Point, torch.Tensor]:
    """Attention patterns [batch, head, query, key] at `points` from the plain model's own
    decoder with eager attention asked for its weights (how the head-role view reads every layer)."""
    plain = h.plain_model()
    plain.set_attn_implementation("eager")  # SDPA computes no weights to return
    try:
        patterns = plain.base_model(input_ids=h.check_inputs(inputs), output_attentions=True).attentions
    finally:
        plain.set_attn_implementation("sdpa")
    return {p: patterns[p.layer] for p in points}


def plain_residuals(h: RecordBackend, inputs: torch.Tensor, points: Sequence[Point],
                    told: Caught | None = None) -> dict[Point, torch.Tensor] | None:
    """The residual stream at `points` from the plain model (SDPA attention, no patterns
    computed or kept): a block's input (resid_pre), its second norm's input (resid_mid:
    x + the attention's write) and its output (resid_post), caught by torch hooks; the
    forward stops once all are caught (`told` of each). None where a second norm is not found."""
    caught, wanted = {}, set(points)

    def keep(point: Point, value: torch.Tensor) -> None:
        caught[point] = value
        if told is not None:
            told(len(caught), len(wanted))
        if len(caught) == len(wanted):
            raise _Stop

    handles = _residual_hooks(h, wanted, keep)
    if handles is None:
        return None
    try:
        h.plain_model().base_model(input_ids=h.check_inputs(inputs), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {p: caught[p] for p in points if p in caught}


@contextmanager
def residuals_kept(h: RecordBackend, points: Sequence[Point]) -> Iterator[dict[Point, torch.Tensor] | None]:
    """Inside, the plain model's forwards keep the residual stream at `points` in the dict
    yielded (each point the last forward's: a short check forward before the real one is
    overwritten by it); the forwards run to their end. None where the hooks cannot be placed
    (as `plain_residuals`). Hold the handle's lock: another thread's forward would fire them."""
    kept: dict[Point, torch.Tensor] = {}
    handles = _residual_hooks(h, set(points), kept.__setitem__)
    if handles is None:
        yield None
        return
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def _residual_hooks(h: RecordBackend, points: set[Point], keep: Callable[[Point, torch.Tensor], None]) -> list | None:
    """Torch hooks on the plain model that give `keep(point, tensor)` each residual-stream
    point as it is computed; None (nothing placed) where the blocks or a second norm are not found."""
    plain, handles = h.plain_model(), []
    try:
        paths = h._block_paths()
    except CapabilityError:  # blocks not found in the plain model: the bridge records them
        return None

    def kept(point: Point, value: torch.Tensor | tuple) -> None:
        keep(point, value[0] if isinstance(value, tuple) else value)

    placed = False
    try:
        for p in points:
            h.hook_name(p)  # refuses a layer the model does not have
            block = plain.get_submodule(paths[p.layer])
            if p.site == "resid_pre":
                handles.append(block.register_forward_pre_hook(
                    lambda _m, args, kwargs, p=p: kept(p, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            elif p.site == "resid_post":
                handles.append(block.register_forward_hook(lambda _m, _args, out, p=p: kept(p, out)))
            else:
                path = h._hf_path(getattr(h.model.blocks[p.layer], "ln2", None) or nn.Module())
                if path is None:
                    return None
                handles.append(plain.get_submodule(path).register_forward_pre_hook(
                    lambda _m, args, p=p: kept(p, args[0])))
        placed = True
        return handles
    finally:
        if not placed:  # refused or not found: nothing stays on the model
            for handle in handles:
                handle.remove()


def plain_patterns(h: RecordBackend, inputs: torch.Tensor, points: Sequence[Point]) -> dict[Point, torch.Tensor]:
    """Attention patterns of a copy the bridge does not compute (parts removed, inputs
    transformed), from its plain model with eager attention: each attention module's
    weights, caught by a forward hook, [batch, heads left, query, key]. A removed
    attention (or block) has none: its point is missing from the result."""
    plain, caught, handles = h.plain_model(), {}, []
    for p in points:
        h.hook_name(p)  # refuses a layer the model does not have
        if not h._heads_left(p.layer):
            continue
        attention = plain.get_submodule(h._hf_path(h.model.blocks[p.layer].attn))
        handles.append(attention.register_forward_hook(
            lambda _m, _args, out, p=p: caught.__setitem__(p, out[1] if isinstance(out, tuple) else None)))
    plain.set_attn_implementation("eager")  # SDPA computes no weights to return
    try:
        plain.base_model(input_ids=h.check_inputs(inputs), use_cache=False)
    finally:
        plain.set_attn_implementation("sdpa")
        for handle in handles:
            handle.remove()
    return {p: caught[p] for p in points if caught.get(p) is not None}


def head_input(h: RecordBackend, inputs: torch.Tensor) -> torch.Tensor:
    """[b, T, d] what the plain model's output layer reads (the final norm's output), caught
    before any input transform of that layer, by a forward that stops there: no logits made."""
    plain, caught = h.plain_model(), []

    def keep(_module: nn.Module, args: tuple) -> None:
        caught.append(args[0])
        raise _Stop

    hook = plain.get_output_embeddings().register_forward_pre_hook(keep, prepend=True)
    try:
        plain(input_ids=inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return caught[0]


def head_readout(h: RecordBackend) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain model's readout of `head_input`: its output layer (with its input transforms),
    then the logit soft-capping some families apply after it. A family that does more than
    this is caught by the check in `BridgeHandle.outputs`."""
    plain = h.plain_model()
    head, cap = plain.get_output_embeddings(), getattr(plain.config, "final_logit_softcapping", None)

    def readout(x: torch.Tensor) -> torch.Tensor:
        z = head(x)
        return z if cap is None else torch.tanh(z / cap) * cap

    return readout


_UNTOLD = threading.local()  # `on` while this thread runs a check forward that no bar counts


def untold():
    """Inside, this thread's forwards tell no `told_of_blocks`: a short check forward before
    the real one would run the bar twice."""
    return set_in_thread(_UNTOLD, "on", True)


@contextmanager
def told_of_blocks(h: RecordBackend, told: Caught) -> Iterator[None]:
    """`told(k, n)` as the k-th of n blocks finishes a forward run by this thread, by torch
    hooks on the plain model's blocks and on the bridge's (whichever path the forward takes;
    the bridge counts hooks on its HookPoints alone, so a forward keeps the plain path it
    would have taken). Under the handle's lock, as `hooks` are: no other session's forward
    runs meanwhile, and a hook a copy made meanwhile carries says nothing once this ends."""
    owner, live, n = threading.get_ident(), [True], len(h.model.blocks)

    def tell(k: int) -> None:
        if live[0] and threading.get_ident() == owner and not getattr(_UNTOLD, "on", False):
            told(k + 1, n)

    with h.lock:
        try:
            plain = [h.plain_model().get_submodule(path) for path in h._block_paths()]
        except CapabilityError:  # blocks not found in the plain model: only the bridge's tell
            plain = []
        handles = [block.register_forward_hook(lambda *_, k=k: tell(k))
                   for blocks in (plain, h.model.blocks) for k, block in enumerate(blocks)]
        try:
            yield
        finally:
            live[0] = False
            for handle in handles:
                handle.remove()


def plain_twin(wrapped: nn.Module) -> nn.Module:
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
