"""Distributed back-ends, by `train.distributed`, for runs of several processes (`--nproc N`, torchrun,
accelerate launch): ddp (data parallel, CPU or GPU), fsdp (full shard, decoder layers wrapped), DeepSpeed
ZeRO-2 / ZeRO-3 / ZeRO-3 with CPU offload (presets in train/presets/). Each is named in
`qatune.plugins.PLUGINS["distributed"]`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.errors import Problem
from qatune.train.checkpoints import TrainError

if TYPE_CHECKING:
    from qatune.config import QatuneConfig

PRESETS = Path(__file__).parent / "presets"  # DeepSpeed configs, one per back-end name


@dataclass(frozen=True)
class DistributedBackend:
    name: str
    shards_model: bool  # the output layer lives in shards outside the forward pass (no chunked loss)
    package: str | None = None  # what it needs installed

    def validate(self, config: "QatuneConfig") -> list[Problem]:
        """Rules across config sections (run by `load_config`): none for these back-ends."""
        return []

    def check(self, device: str) -> None:
        """Refuse, before anything is loaded, what this machine cannot run (plain DDP runs anywhere)."""
        if not self.shards_model and self.package is None:
            return
        if device != "cuda":
            raise TrainError(f"train.distributed={self.name} shards the model over CUDA GPUs; this machine has none",
                             hint="use train.distributed=ddp (data parallel, also on CPUs with the gloo backend)")
        if self.package and importlib.util.find_spec(self.package) is None:
            raise TrainError(f"train.distributed={self.name} needs the {self.package} package",
                             hint=f"pip install {self.package}")

    def training_arguments(self, decoder_layers: list[str]) -> dict[str, Any]:
        """TrainingArguments of this back-end (plain DDP needs none: torchrun's environment is enough)."""
        return {}


class FullyShardedBackend(DistributedBackend):
    def training_arguments(self, decoder_layers: list[str]) -> dict[str, Any]:
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"transformer_layer_cls_to_wrap": decoder_layers, "use_orig_params": True}}


class DeepSpeedBackend(DistributedBackend):
    def training_arguments(self, decoder_layers: list[str]) -> dict[str, Any]:
        return {"deepspeed": str(PRESETS / f"{self.name}.json")}


DDP = DistributedBackend("ddp", shards_model=False)
FSDP = FullyShardedBackend("fsdp", shards_model=True)
ZERO2 = DeepSpeedBackend("deepspeed_zero2", shards_model=False, package="deepspeed")
ZERO3 = DeepSpeedBackend("deepspeed_zero3", shards_model=True, package="deepspeed")
ZERO3_OFFLOAD = DeepSpeedBackend("deepspeed_zero3_offload", shards_model=True, package="deepspeed")


def backend(name: str) -> DistributedBackend:
    """The back-end named by train.distributed."""
    from qatune import plugins

    return plugins.load("distributed", name)
