"""``finetune='last-stage'``: train the backbone's last stage together with the head.

The last stage is named per family by the model adapters (``timm_models.last_stage``,
``tv.FAMILIES``; never guessed): timm EfficientNet-style models (the embedded default) train
their last block group and the final 1x1 convolution + norm; ResNets ``layer4``; DenseNets
``denseblock4`` + ``norm5``; torchvision MobileNetV2 / EfficientNet the last two modules of
``features`` (the last block group and the final 1x1 convolution); MNASNet its last block stack
and the final 1x1 convolution + norm; ShuffleNetV2 ``stage4`` + ``conv5``; RegNets the last
trunk block. BatchNorm layers keep their running statistics (the whole network stays in eval
mode; small CPU batches would make them noisy). Each epoch sees augmented images (random
resized crop, horizontal flip, brightness and contrast jitter) drawn from a generator seeded
by (seed, epoch, image).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gapcam import images
from gapcam.console import progress_bar
from gapcam.errors import TrainingError
from gapcam.models import timm_models, tv
from gapcam.models.base import GapModel, inference_state
from gapcam.models.weights import load_tensors
from gapcam.train.loop import (
    LoopState,
    Report,
    Settings,
    Standardizer,
    epoch_generator,
    epochs_left,
    head_tensors,
    load_optimizer,
    make_optimizer,
    new_head,
    optimizer_tensors,
    scores,
)
from gapcam.types import FINETUNE_MODES

MODES = FINETUNE_MODES
BACKBONE_LR_SCALE = 0.1


def last_stage(module: nn.Module) -> list[str]:
    """Parameter-name prefixes of the last stage of a supported backbone, as its adapter names
    them (``timm_models.last_stage``, then each torchvision family's ``Family.last_stage``)."""
    for adapter in (timm_models.last_stage, tv.last_stage):
        found = adapter(module)
        if found is not None:
            return found
    raise TrainingError(
        f"finetune='last-stage': gapcam does not know the last stage of "
        f"{type(module).__name__}; supported: the embedded EfficientNet-Lite models, timm EfficientNets, "
        "ResNets, DenseNets, MobileNetV2, torchvision EfficientNets, MNASNet, ShuffleNetV2, "
        "RegNets; or train the head only"
    )


def stage_names(model: GapModel) -> list[str]:
    """State-dict names (parameters and buffers) of the last stage: what the run saves."""
    prefixes = tuple(last_stage(model.module))
    return [name for name in model.module.state_dict() if name.startswith(prefixes)]


def augment(image: Image.Image, model: GapModel, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop (60-100% of the area), flip, brightness/contrast jitter; HxWx3 uint8."""
    width, height = image.size
    area = rng.uniform(0.6, 1.0) * width * height
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = images.resize_for_model(crop, model.preprocess).astype(np.float32)
    mean = array.mean()
    array = (array - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
    return np.clip(array, 0, 255).astype(np.uint8)


@contextmanager
def trainable_stage(model: GapModel, names: Sequence[str]) -> Iterator[list[nn.Parameter]]:
    """Only the last stage's parameters require grad; every module in eval mode; all restored."""
    prefixes = tuple(last_stage(model.module))
    flags = [(m, m.training) for m in model.module.modules()]
    grads = [(p, p.requires_grad) for p in model.module.parameters()]
    try:
        model.module.eval()
        chosen = []
        for name, parameter in model.module.named_parameters():
            parameter.requires_grad_(name.startswith(prefixes))
            if name.startswith(prefixes):
                chosen.append(parameter)
        yield chosen
    finally:
        for module, flag in flags:
            module.training = flag
        for parameter, flag in grads:
            parameter.requires_grad_(flag)


def _pooled(model: GapModel, arrays: list[np.ndarray]) -> torch.Tensor:
    x = images.to_tensor(arrays, model.preprocess)
    x = x.to(device=model.device, dtype=model.weight.dtype)
    return model.pooled(model.features(x)).float()


def _load(path: Path) -> Image.Image:
    return images.load_image(path).image


def fit_last_stage(
    model: GapModel,
    train: Sequence[tuple[Path, int]],
    val: Sequence[tuple[Path, int]],
    norm: Standardizer,
    settings: Settings,
    state: LoopState,
    report: Report,
    quiet: bool = False,
) -> LoopState:
    """Train the last stage and the head (initialised from the head phase's best) on images."""
    names = stage_names(model)
    if state.last:
        load_tensors(model.module, _backbone(state.last))
    head = new_head(len(norm.mean), model.num_classes, state.last or None).to(model.device)
    norm = norm.to(model.device)
    with trainable_stage(model, names) as parameters:
        groups = [
            {"params": parameters, "lr": settings.lr * BACKBONE_LR_SCALE},
            {"params": list(head.parameters()), "lr": settings.lr},
        ]
        optimizer = make_optimizer(groups, settings)
        load_optimizer(optimizer, state.optimizer)
        for epoch in epochs_left(state, settings):
            started = time.perf_counter()
            train_loss, train_accuracy = _train_epoch(
                model, head, norm, train, optimizer, settings, epoch, quiet
            )
            val_loss, val_accuracy, predictions = _validate(model, head, norm, val, settings)
            row = {"phase": "finetune", "epoch": epoch, "train_loss": train_loss}
            row |= {"train_accuracy": train_accuracy, "val_loss": val_loss}
            row |= {"val_accuracy": val_accuracy, "seconds": time.perf_counter() - started}
            tensors = head_tensors(head) | _stage_tensors(model, names)
            better = state.record(row, tensors, predictions)
            state.last, state.optimizer = tensors, optimizer_tensors(optimizer)
            report(state, better)
    return state


def _train_epoch(
    model: GapModel,
    head: nn.Linear,
    norm: Standardizer,
    train: Sequence[tuple[Path, int]],
    optimizer: torch.optim.Optimizer,
    settings: Settings,
    epoch: int,
    quiet: bool,
) -> tuple[float, float]:
    generator = epoch_generator(settings, "finetune", epoch)
    order = torch.randperm(len(train), generator=generator).tolist()
    total_loss, correct = 0.0, 0
    bar = progress_bar(len(train), f"epoch {epoch}", quiet=quiet)
    for start in range(0, len(order), settings.batch_size):
        chosen = order[start : start + settings.batch_size]
        arrays = [
            augment(_load(train[i][0]), model, np.random.default_rng([settings.seed, epoch, i]))
            for i in chosen
        ]
        labels = torch.tensor([train[i][1] for i in chosen], device=model.device)
        logits = head(norm(_pooled(model, arrays)))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(chosen)
        correct += int((logits.detach().argmax(dim=1) == labels).sum())
        bar.update(len(chosen))
    bar.close()
    return total_loss / len(train), correct / len(train)


def _validate(
    model: GapModel,
    head: nn.Linear,
    norm: Standardizer,
    val: Sequence[tuple[Path, int]],
    settings: Settings,
) -> tuple[float, float, list[int]]:
    chunks = []
    with inference_state(model.module):
        for start in range(0, len(val), settings.batch_size):
            batch = val[start : start + settings.batch_size]
            arrays = [images.resize_for_model(_load(p), model.preprocess) for p, _ in batch]
            chunks.append(head(norm(_pooled(model, arrays))))
    labels = torch.tensor([label for _, label in val])
    return scores(torch.cat(chunks).float().cpu(), labels)


def _stage_tensors(model: GapModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    state = model.module.state_dict()
    return {f"backbone.{name}": state[name].detach().cpu().clone() for name in names}


def _backbone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
