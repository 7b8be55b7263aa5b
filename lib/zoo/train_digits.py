"""Train `zoo:digits-cnn` (classifier) and `zoo:digits-denoiser` (noisy -> clean)
on the training split of scikit-learn digits; metrics on the held-out split."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lib import corpus, data
from lib.models import save_image_model
from lib.zoo.nets import build

STEPS = {"digits-cnn": 3000, "digits-denoiser": 6000}
BATCH, LR = 64, 2e-3


def _psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / F.mse_loss(pred.clamp(0, 1), target).item())


def train(name: str, out, seed: int, steps: int | None) -> dict:
    from tqdm import trange

    steps = steps or STEPS[name]
    torch.manual_seed(seed)
    model = build(name)
    images, labels = corpus.digits_split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = trange(steps, unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (BATCH,), generator=gen)
        x, y = images[idx], labels[idx]
        if name == "digits-cnn":
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # small translations
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
        else:
            noisy = (x + torch.randn(x.shape, generator=gen) * corpus.DIGITS_NOISE_STD).clamp(0, 1)
            loss = F.mse_loss(model(noisy), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    save_image_model(model, name, out)
    n_params = sum(p.numel() for p in model.parameters())
    arch = " -> ".join(f"{n} ({d})" for n, d in _stage_words(model))
    summary: dict = {"steps": steps, "params": n_params,
                     "architecture": f"{arch}; {n_params:,} parameters, ReLU, no normalisation."}
    with torch.no_grad():
        if name == "digits-cnn":
            batch = data.digits_batch()
            summary["heldout_accuracy"] = (model(batch.images).argmax(-1) == batch.labels).float().mean().item()
            summary["heldout_size"] = len(batch.labels)
        else:
            batch = data.digits_batch(denoise=True)
            summary["noisy_psnr_db"] = _psnr(batch.images, batch.targets)
            summary["denoised_psnr_db"] = _psnr(model(batch.images), batch.targets)
            summary["psnr_gain_db"] = summary["denoised_psnr_db"] - summary["noisy_psnr_db"]
    return summary


def _stage_words(model) -> list[tuple[str, str]]:
    from lib.image_handle import _describe_stage

    return [(n, _describe_stage(m)) for n, m in model.stages.items()]
