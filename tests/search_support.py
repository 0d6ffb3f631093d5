"""Shared set-up of the search tests: a real INT8 checkpoint built in-process (real CIM layers)."""
from __future__ import annotations

from pathlib import Path

import torch

from lib.cim import HardwareConfig, quantize_model
from lib.model_spec import DEFAULT_HARDWARE, ModelSpec
from lib.search import SearchConfig
from lib.training import make_checkpoint, save_checkpoint
from models import create_model


def make_int8_checkpoint(out_dir: Path, arch: str = "tiny_cnn", input_size: int = 16, quant: str = "uniform",
                         hardware: Path = DEFAULT_HARDWARE, dataset: str = "digits-small") -> Path:
    """A uniform-INT8 (or FP32 with quant='none') checkpoint of `arch`, calibrated on random images."""
    torch.manual_seed(0)
    model = create_model(arch, 10)
    hw = HardwareConfig.from_yaml(hardware) if quant != "none" else None
    if quant != "none":
        batches = [torch.randn(4, 3, input_size, input_size) for _ in range(2)]
        quantize_model(model, (8, 8), hw, input_size=input_size, calibration_data=batches)
    spec = ModelSpec(arch=arch, num_classes=10, input_size=input_size, dataset=dataset, quant=quant,
                     hardware=hw, hardware_path=str(hardware) if hw else None)
    state = make_checkpoint(epoch=1, state_dict=model.state_dict(), args=spec.to_args())
    save_checkpoint(state, out_dir, is_best=True)
    return out_dir / "model_best.pth.tar"


def tiny_config(init: Path, out: Path, **changes) -> SearchConfig:
    """A search of a few seconds: 3 episodes, 1 warm-up, 2 finetune batches of 16 images."""
    base = dict(init=str(init), output_dir=str(out), episodes=3, warmup=1, finetune_steps=2, batch_size=16,
                search_holdout=32, search_train_size=128, top_k=2, top_k_finetune_steps=2, calibration_batches=1,
                progress=False, tensorboard=True, device="cpu")
    base.update(changes)
    return SearchConfig(**base)
