"""A ReLU network frozen on one input's linear region (`lib.capabilities.LinearRegions`),
built on its `TorchHandle` (reading only what `TorchBackend` declares): the Interpreter's exact map A(x0)·x + b(x0)."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from lib.capabilities import LinearRegions
from lib.errors import CapabilityError
from lib.hooks import forward_hooks


class TorchBackend(Protocol):
    """What `CNNRegions` reads of its handle; `lib.image_handle.TorchHandle` defines each."""

    lock: AbstractContextManager[Any]
    model: nn.Module  # its stages in `model.stages`
    base_fingerprint: str | None  # None on a base model

    @property
    def dtype(self) -> torch.dtype: ...


class CNNRegions(LinearRegions):
    """The linear regions of a `TorchHandle`'s network: every ReLU / LeakyReLU gate and
    max-pool choice frozen at its state for one input."""

    def __init__(self, handle: TorchBackend) -> None:
        self.handle = handle

    # layers whose output is an affine function of their input (batch norm: in eval mode, folded statistics)
    _AFFINE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Flatten, nn.Identity, nn.Dropout, nn.AvgPool2d,
               nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d)
    _GATED = (nn.ReLU, nn.LeakyReLU)  # frozen as input · gate (1, or 0 / the negative slope)
    _SWITCHED = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)  # frozen as the positions picked
    _CONTAINERS = (nn.Sequential, nn.ModuleDict, nn.ModuleList)

    def _leaf_layers(self) -> list[tuple[str, nn.Module]]:
        """(path under `stages`, module) of every layer the stages run, in forward order."""
        out: list[tuple[str, nn.Module]] = []

        def walk(prefix: str, module: nn.Module) -> None:
            if isinstance(module, self._CONTAINERS):
                for name, child in module.named_children():
                    walk(f"{prefix}.{name}" if prefix else name, child)
            else:
                out.append((prefix, module))

        walk("", self.handle.model.stages)
        return out

    def nonlinearities(self) -> list[tuple[str, str]]:
        """(layer path, type name) of every layer whose output is not affine in its input,
        in forward order: what `frozen_at` freezes. Raises CapabilityError naming the first
        layer that is neither affine nor piecewise linear in a way that can be frozen."""
        found = []
        for path, module in self._leaf_layers():
            if isinstance(module, self._GATED + self._SWITCHED):
                found.append((path, type(module).__name__))
            elif not isinstance(module, self._AFFINE) or (isinstance(module, nn.modules.batchnorm._BatchNorm)
                                                          and module.training):
                supported = ", ".join(t.__name__ for t in self._AFFINE + self._GATED + self._SWITCHED)
                raise CapabilityError(
                    f"The linear interpreter needs a network that is piecewise affine in its input; layer "
                    f"'{path}' is a {type(module).__name__}, which it cannot freeze into an affine map "
                    f"(supported layers: {supported}; batch norm in eval mode).")
        return found

    @contextmanager
    def frozen_at(self, x0: torch.Tensor) -> Iterator[torch.Tensor]:
        """Freeze every nonlinearity at its state for one input x0 [1, C, H, W] and yield the
        model's real output F(x0) [1, ...] (from an unfrozen forward).

        Inside, each ReLU / LeakyReLU multiplies its input by the gate it had for x0 and each
        max-pool takes the positions it picked for x0, for inputs of any batch size: the
        model is the affine map x -> A(x0) x + b(x0) of x0's linear region (run it with
        `differentiable_forward`). The hooks go on exit, also when the body raises.
        """
        layers = dict(self._leaf_layers())
        frozen = [(layers[path], path) for path, _ in self.nonlinearities()]
        states: dict[str, torch.Tensor] = {}
        with self.handle.lock:
            with forward_hooks([(m, self._state_recorder(path, states)) for m, path in frozen]), torch.no_grad():
                output = self.handle.model(x0.to(self._param_dtype()))
            with forward_hooks([(m, self._state_replayer(path, states)) for m, path in frozen]):
                yield output

    def differentiable_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output for `inputs` [batch, C, H, W] (cast to the model's dtype) with
        autograd on, so gradients reach the inputs. Use on a private copy."""
        with self.handle.lock, torch.enable_grad():
            return self.handle.model(inputs.to(self._param_dtype()))

    def attribution_module(self) -> nn.Module:
        """This private copy's network as a torch module [batch, C, H, W] -> outputs, for
        attribution methods that hook its layers themselves (captum's DeepLift)."""
        if self.handle.base_fingerprint is None:
            raise CapabilityError("Attribution methods hook the network they run on; use a private copy "
                                  "(`handle.private_copy()`), never the shared base model.")
        return self.handle.model

    def _param_dtype(self) -> torch.dtype:
        return self.handle.dtype

    @staticmethod
    def _state_recorder(path: str, states: dict[str, torch.Tensor]) -> Callable:
        """Hook that keeps a layer's state for x0: a gate [1, ...] or max-pool positions."""

        def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(module, nn.ReLU):
                states[path] = (x > 0).to(x.dtype)
            elif isinstance(module, nn.LeakyReLU):
                states[path] = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, module.negative_slope))
            elif isinstance(module, nn.MaxPool2d):
                states[path] = nn.functional.max_pool2d(x, module.kernel_size, module.stride, module.padding,
                                                        module.dilation, module.ceil_mode, return_indices=True)[1]
            else:
                states[path] = nn.functional.adaptive_max_pool2d(x, module.output_size, return_indices=True)[1]

        return hook

    @staticmethod
    def _state_replayer(path: str, states: dict[str, torch.Tensor]) -> Callable:
        """Hook that replaces a layer's output by its frozen form: a new tensor, linear in the input."""

        def hook(module: nn.Module, inputs: tuple, _output: torch.Tensor) -> torch.Tensor:
            x, state = inputs[0], states[path]
            if isinstance(module, CNNRegions._GATED):
                return x * state
            batch, channels = x.shape[:2]  # positions picked for x0, per channel of the flattened map
            picked = x.flatten(2).gather(2, state.flatten(2).expand(batch, channels, -1))
            return picked.view(batch, channels, *state.shape[2:])

        return hook
