"""A model's linear layers by readable name (`blocks.3.mlp.in`, `conv2`): where each
sits, its parameter, replacing it on a private copy, transforming its inputs
(activation quantization), its calibration statistics, and torch's int8 kernel in its
place. A base class of `ModelHandle` (lib/handle.py), which provides what `LinearLayers`
declares it needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lib.errors import CapabilityError, RecipeError
from lib.hooks import forward_pre_hooks
from lib.locks import exclusive

# An input transform: gets a linear layer's input, returns a replacement or None (keep it).
InputTransform = Callable[[torch.Tensor], "torch.Tensor | None"]


class LinearLayers(ABC):
    """Linear layers by readable name.

    What it needs from the model class (`ModelHandle` and its backends provide it):
    kind; lock, the re-entrant lock every use of the model holds; base_fingerprint (None on
    a base model) and input_transforms, set up by `ModelHandle.__init__`; `weights()`,
    `weights_changed()` and `private_copy()`; and from each backend `_linear_modules()`,
    `_forward_weights_only()` and `replace_linear_()`.
    """

    kind: str
    lock: AbstractContextManager[Any]
    base_fingerprint: str | None
    input_transforms: dict[str, InputTransform]

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """Every distinct tensor the forward reads, by readable name."""

    @abstractmethod
    def weights_changed(self) -> None:
        """Forget the memoised fingerprint (after editing a private copy)."""

    @abstractmethod
    def private_copy(self, dtype: torch.dtype | None = None, requires_grad: bool = False) -> LinearLayers:
        """A copy that edits can never leak from."""

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

    def linear_parameter(self, name: str) -> tuple[nn.Parameter, nn.Parameter | None, bool]:
        """The weight parameter of linear layer `name` as stored, its bias, and whether it
        is stored [in, out] (GPT-2's Conv1D) rather than [out, in]."""
        module = self._linear_modules().get(name)
        if module is None:
            raise CapabilityError(f"The model has no linear layer {name!r}.")
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            raise CapabilityError(f"{name} is a convolution; only fully connected layers can be factorised or shared.")
        return module.weight, getattr(module, "bias", None), type(module).__name__ == "Conv1D"

    @abstractmethod
    def replace_linear_(self, name: str, module: nn.Module) -> None:
        """Put `module` in place of linear layer `name` in this private copy (it computes
        the same kind of map: inputs [..., in] -> outputs [..., out])."""

    @abstractmethod
    def _linear_modules(self) -> dict[str, nn.Module]:
        """Readable name -> module, for the layers `linear_layers()` lists."""

    def _named_linear(self, names: Sequence[str]) -> dict[str, nn.Module]:
        """The linear modules called `names`; an unknown name is a CapabilityError."""
        modules = self._linear_modules()
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise CapabilityError(f"The model has no linear layer(s) {', '.join(unknown[:3])}.")
        return {n: modules[n] for n in names}

    def weight_name(self, layer: str) -> str:
        """The `weights()` (and `storage`) name of linear layer `layer`'s weight, e.g.
        `blocks.0.mlp.in.weight`, or `conv1.0.weight` for the zoo CNN's stage conv1."""
        weight = self._named_linear([layer])[layer].weight
        for name, tensor in self.weights().items():
            if tensor is weight:
                return name
        raise CapabilityError(f"The weight of linear layer {layer} is not among this model's weights.")

    @contextmanager
    def transforming_inputs(self, transforms: Mapping[str, InputTransform]) -> Iterator[None]:
        """Inside the block, the input x of each named linear layer is replaced by
        `transforms[name](x)` (None keeps x) in every plain forward: `forward` outside
        `hooks(...)`, and `input_norms` / `input_grams`. Torch forward pre-hooks on the modules
        `_linear_modules()` returns (for LMs, those of the plain transformers model the
        hook-free forward runs); they go on exit, also when the body raises. The lock is held
        throughout, so no other session's forward sees them."""
        with self.lock:
            modules = self._named_linear(list(transforms))
            with forward_pre_hooks([(modules[n], _InputHook(fn)) for n, fn in transforms.items()]):
                yield

    def set_input_transform_(self, layer: str, transform: InputTransform) -> None:
        """Make `transform` part of this private copy: from now on every plain forward feeds
        linear layer `layer` `transform(x)` instead of x (activation quantization), and so do
        private copies of this copy. `transform` should have a repr that says what it does
        (it enters the fingerprint). Never on a base model."""
        if self.base_fingerprint is None:
            raise RecipeError("Input transforms are set on a private copy (`handle.private_copy()`), "
                              "never on a loaded base model.")
        self._named_linear([layer])
        self.input_transforms[layer] = transform
        self._wire_input_transforms()
        self.weights_changed()

    def _wire_input_transforms(self) -> None:
        """Put exactly one permanent pre-hook per entry of `input_transforms` on the modules
        (a deep copy carries old ones, or none where a module was rebuilt). A layer that is
        no longer a linear layer of this copy (replaced, removed) loses its transform."""
        modules = self._linear_modules()
        for name in [n for n in self.input_transforms if n not in modules]:
            del self.input_transforms[name]
        for name, module in modules.items():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, _PermanentInput):
                    del module._forward_pre_hooks[key]
            if name in self.input_transforms:
                module.register_forward_pre_hook(_PermanentInput(self.input_transforms[name]))

    @exclusive
    @torch.no_grad()
    def input_grams(self, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sigma = X^T X over every position of `inputs` for each linear layer of `names`
        (calibration statistic of QuantEase / GPTQ): float32 [in, in] per layer ([in * kh * kw]
        square for a convolution, whose inputs are its im2col columns)."""
        modules = self._named_linear(names)
        sums: dict[str, torch.Tensor] = {}

        def keep(name: str, module: nn.Module) -> Callable:
            def pre_hook(_m: nn.Module, args: tuple) -> None:
                x = _input_columns(module, args[0])  # [positions, in]
                sums[name] = sums.get(name, 0) + x.T @ x

            return pre_hook

        with forward_pre_hooks([(modules[n], keep(n, modules[n])) for n in names]):
            self._forward_weights_only(inputs)
        return {n: sums[n] for n in names}

    @exclusive
    @torch.no_grad()
    def input_norms(self, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """||X_j||_2 over every position of `inputs` for each input column j of the linear
        layers `names` (Wanda's activation statistic): [in] per layer ([in * kh * kw] for a
        convolution, matching its weight viewed as [out, in * kh * kw])."""
        modules = self._named_linear(names)
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

    def int8_kernel_copy(self, names: Sequence[str] | None = None) -> tuple[LinearLayers, dict[str, int]]:
        """A private copy whose fully connected layers `names` (default: all; nn.Linear,
        GPT-2's Conv1D; convolutions are skipped) run torch's dynamic int8 CPU kernel: weights
        int8 per output channel, inputs quantized per batch on the fly (torch.ao
        `DynamicQuantizedLinear`). Returns the copy and, per converted layer, the bytes its
        int8 weights, scales and bias take. The copy is for measuring, not for editing."""
        import warnings

        try:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig
        except ImportError as e:
            raise CapabilityError(f"This torch build has no dynamic int8 kernel ({e}).") from e
        new = self.private_copy()
        sizes = {}
        with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated, still the CPU kernel
            warnings.simplefilter("ignore")
            for name, weight in new.linear_layers().items():
                module = new._linear_modules()[name]
                if names is not None and name not in names or weight.dim() != 2 or weight.dtype != torch.float32:
                    continue
                float_linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
                float_linear.weight.data = weight.detach().contiguous()
                if module.bias is not None:
                    float_linear.bias.data = module.bias.detach()
                float_linear.qconfig = per_channel_dynamic_qconfig
                kernel = DynamicLinear.from_float(float_linear)
                module.forward = kernel.forward  # this instance now runs the int8 kernel
                packed = kernel.weight()
                # int8 codes, float32 scales and int32 zero points per channel (fbgemm's packing), float bias
                sizes[name] = packed.numel() + 8 * weight.shape[0] + 4 * weight.shape[0] * (module.bias is not None)
        if not sizes:
            raise CapabilityError("This model has no float32 fully connected layers for the int8 kernel.")
        return new, sizes


class _InputHook:
    """A forward pre-hook that replaces a module's first input by `fn(input)` (unless None)."""

    def __init__(self, fn: InputTransform) -> None:
        self.fn = fn

    def __call__(self, _module: nn.Module, args: tuple) -> tuple | None:
        new = self.fn(args[0])
        return None if new is None else (new, *args[1:])


class _PermanentInput(_InputHook):
    """An `_InputHook` that belongs to an edited copy's definition (`set_input_transform_`)."""


def _input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's input as rows of what its weight rows multiply: [positions, in]
    ([positions, in * kh * kw], the im2col columns, for a convolution)."""
    if isinstance(module, nn.ConvTranspose2d):
        raise CapabilityError("The inputs of a transposed convolution have no column form here; "
                              "use an edit that does not need calibration inputs.")
    x = x.float()
    if isinstance(module, nn.Conv2d):  # [b, in*kh*kw, positions]
        x = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        x = x.transpose(1, 2)
    return x.reshape(-1, x.shape[-1])
