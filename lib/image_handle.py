"""Plain torch image models made of named stages (`model.stages`), e.g. the zoo's CNNs."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lib.checkpoint import save_image_model
from lib.errors import CapabilityError, DataError
from lib.handle import ActivationHook, ModelHandle, Part, Point, Structure
from lib.hooks import forward_hooks
from lib.image_regions import CNNRegions
from lib.locks import exclusive
from lib.storage import distinct_tensors


class TorchHandle(ModelHandle):
    """A plain torch image model made of named stages (`model.stages`)."""

    sites = ("stage",)

    def __init__(self, spec: str, model: nn.Module, kind: str, architecture: str,
                 build_kwargs: dict | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.build_kwargs = dict(build_kwargs or {})  # how `lib.zoo.nets.build` makes this network
        self.model = model.eval()
        self.kind = kind
        self.tokenizer = None
        self.eval_task = "digits" if kind == "image-classifier" else "noisy-digits"
        self.structure = Structure(architecture=architecture, n_layers=len(model.stages),
                                   stages=self._stage_rows())

    def _stage_rows(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, _describe_stage(m)) for name, m in self.model.stages.items())

    def weights(self) -> dict[str, torch.Tensor]:
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return distinct_tensors(iter((n.removeprefix("stages."), t) for n, t in named))

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
        return self.model(self.check_inputs(inputs))

    def check_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images [batch, C, H, W] in the model's own dtype: another floating dtype
        (float64, float16) is converted; integer pixels are refused, since the scale they
        are on cannot be told."""
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            what = f"a {inputs.dtype} tensor" if isinstance(inputs, torch.Tensor) else f"a {type(inputs).__name__}"
            raise DataError(f"An image model reads floating-point images [batch, 1, H, W] (pixels scaled to 0 ... 1), "
                            f"not {what}. Convert the images first, e.g. images.float() / images.max().")
        return inputs.to(self.device, self.dtype)

    @exclusive
    @torch.no_grad()
    def _forward_every_layer(self, inputs: torch.Tensor) -> torch.Tensor:
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
        if isinstance(self.model.stages[part.layer], nn.Identity):
            return f"Stage {part.layer} is already bypassed in this copy."
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

    def replace_linear_(self, name: str, module: nn.Module) -> None:
        if name not in self._linear_modules():
            raise CapabilityError(f"The model has no linear layer {name!r}.")
        path = next(p for p, m in self.model.named_modules() if m is self._linear_modules()[name])
        owner, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(owner), attr, module)
        self.structure = replace(self.structure, stages=self._stage_rows())
        self.refresh_structure(f"{name} replaced")
        self.weights_changed()

    def save_pretrained(self, folder: Any) -> None:
        """Write this model (bypassed stages included) as a folder `load_model` reads."""
        removed = tuple(name for name, m in self.model.stages.items() if isinstance(m, nn.Identity))
        model = self.model
        replaced = [(p, m) for p, m in model.named_modules() if hasattr(m, "dense")]
        if replaced:  # factorised or shared layers are written back as the plain layers they replaced
            model = copy.deepcopy(model)
            for path, module in replaced:
                owner, _, attr = path.rpartition(".")
                dense = module.dense()
                out_features, in_features = dense["weight"].shape
                plain = nn.Linear(in_features, out_features, bias="bias" in dense)
                plain.load_state_dict(dense)
                setattr(model.get_submodule(owner), attr, plain)
        save_image_model(model, self.structure.architecture, Path(folder), removed_stages=removed,
                         **self.build_kwargs)

    def _strip_hooks(self) -> None:
        for module in self.model.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._backward_hooks.clear()

    @property
    def gates(self) -> CNNRegions:
        """The network frozen on one input's linear region (Interpreter)."""
        return CNNRegions(self)

    # ---- early exits

    @exclusive
    @torch.no_grad()
    def exit_states(self, inputs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The input of every stage ([batch, ...] each: the images, then each stage's output
        but the last) and the model's output, from one forward."""
        stages = list(self.model.stages.values())
        seen: dict[int, torch.Tensor] = {}

        def keep(index: int) -> Callable:
            def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
                seen[index] = output

            return hook

        with forward_hooks([(stage, keep(i)) for i, stage in enumerate(stages[:-1])]):
            outputs = self._forward_every_layer(inputs)
        return [inputs] + [seen[i] for i in range(len(stages) - 1)], outputs


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
