"""Checkpoints in: the pretrained CLIP and each task's fine-tuned visual tower, from every layout users have.

Layouts (docs/checkpoints.md), all mapped to canonical visual keys (those of ``model.visual.state_dict()``):

- task_vectors pickles of whole modules (``finetuned.pt``, ``zeroshot.pt``, ``nonlinear_finetuned.pt``,
  ``head_<Task>.pt``): read with the restricted unpickler of :mod:`.unpickle`, so nothing the file names is imported
  or run;
- the authors' HF ``pytorch_model.bin`` and other plain state dicts (``.pt`` / ``.pth`` / ``.bin``):
  ``torch.load(weights_only=True)``;
- ``.safetensors`` (recognised by suffix or header);
- Hugging Face transformers CLIP (``CLIPModel`` / ``CLIPVisionModel`` state dicts, alone or in a directory with
  config.json), converted to open_clip's keys by :mod:`.layouts.transformers_clip`;
- a directory holding one of those files (a transformers or open_clip save, a task_vectors task folder).

What a file's keys mean is decided by the layout registry (:mod:`.layouts`): a new layout is one module there plus
one registration. docs/checkpoints.md shows every layout and what is read from it.

Keys may carry any prefix (``model.visual.``, ``visual.``, ``module.``, ``state_dict.``, none): the visual tower is the
prefix under which most of the pretrained tower's keys live, skipping a prefix whose ``visual.`` child also matches
(text and vision towers share key names such as ``transformer.resblocks.0.ln_1.weight``).

QuickGELU: OpenAI weights use it and nothing in a state dict tells, so a mismatch would silently change every
activation. Evidence comes from the model name (``-quickgelu``), the model config's ``quick_gelu``, the pretrained tag
(``models/architectures.json`` ``quick_gelu_tags`` and open_clip's tag metadata) and pickled modules (a class named
``QuickGELU``, or torch's ``GELU``). Any disagreement, with the caller's ``quick_gelu`` or within the evidence, is a
ConfigError.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mass_export.core import catalog
from mass_export.core.errors import CheckpointError, ConfigError, MissingCheckpoints
from mass_export.merging import layouts, unpickle
from mass_export.merging.layouts import transformers_clip

VISUAL = "visual."
# Preference order inside one task folder (see find_task_checkpoints): the registered layouts' file names.
TASK_FILES = layouts.task_files()
FLAT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")  # <root>/<Task>.<suffix>
PRETRAINED_FILES = ("zeroshot.pt", "zeroshot.safetensors")
HEAD_SUFFIXES = (".pt", ".safetensors")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_SHOWN = 5  # keys listed per problem before "... (N in all)"


@dataclass
class PretrainedModel:
    model: torch.nn.Module  # open_clip CLIP, eval mode, fp32, cpu, requires_grad off
    name: str  # open_clip model name, the config file's stem, or the hf-hub:/local-dir: string as given
    pretrained: str  # tag or file path as given; for hf-hub:/local-dir: without one, the weights' source
    quick_gelu: bool
    config: dict  # open_clip model config (quick_gelu set to the value used)
    has_text: bool  # the whole text tower was loaded (zero-shot heads can be computed)
    preprocess: dict = field(default_factory=dict)  # image_size, mean, std, interpolation, resize_mode


@dataclass
class Checkpoint:
    """One file's tensors under their dotted names as stored, and the pickled classes it instantiated."""

    path: Path
    tensors: dict[str, torch.Tensor]  # open_clip keys (converted by the file's layout)
    classes: set[str]
    root: object
    layout: str = ""  # what the file looks like, e.g. "a transformers CLIPVisionModel state dict"
    from_pretrained: frozenset[str] = frozenset()  # visual keys this layout lacks by design (taken from pretrained)
    config_quick_gelu: bool | None = None  # what a config saved beside the weights says
    config_source: str = ""

    @property
    def quick_gelu(self) -> bool | None:
        names = {c.rsplit(".", 1)[-1] for c in self.classes}
        if "QuickGELU" in names:
            return True
        if "GELU" in names:
            return False
        return self.config_quick_gelu

    @property
    def quick_gelu_source(self) -> str:
        if self.config_quick_gelu is not None and not ({c.rsplit(".", 1)[-1] for c in self.classes}
                                                       & {"QuickGELU", "GELU"}):
            return self.config_source
        return f"checkpoint {self.path}"


# ---------------------------------------------------------------- reading files


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then the JSON header
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def weights_in(folder: Path) -> Path:
    """The weights file of a checkpoint directory (task_vectors task folder, open_clip or transformers save)."""
    hit = next((folder / name for name in TASK_FILES if (folder / name).is_file()), None)
    if hit is None:
        raise CheckpointError(f"{folder}: a directory without a weights file (looked for {', '.join(TASK_FILES)})")
    return hit


def read_checkpoint(path) -> Checkpoint:
    """Every tensor in a file (or a checkpoint directory's weights file), of any supported layout, under open_clip's
    keys; CheckpointError naming the file for anything unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = weights_in(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        root = tensors
    elif unpickle.is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive (e.g. OpenAI's JIT .pt), not loaded: it carries code. "
                              "Use the open_clip tag (openai) or save its state_dict() instead")
    else:
        root = _torch_load(path)
    tensors, classes = unpickle.collect_tensors(root)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors ({type(root).__name__})")
    converted = layouts.recognise(tensors).convert(tensors, path.parent)
    return Checkpoint(path, converted.tensors, classes, root, converted.layout, converted.from_pretrained,
                      converted.quick_gelu, converted.evidence)


def _torch_load(path: Path):
    # Always the restricted unpickler, never torch's weights_only one first: that one builds bytearray(n) for any
    # n the file names (a 32-byte file allocated 2 GB), ours bounds every size by the file's (merging/unpickle.py).
    try:
        return unpickle.load_file(path)
    except unpickle.UnsafePickle as exc:
        raise CheckpointError(f"{path}: refused, nothing in it was run: {exc}") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError... on foreign bytes
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (torch, safetensors or pickle): "
                              f"{type(exc).__name__}: {first}") from None


def _few(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _visual_prefix(keys, reference) -> str | None:
    """The prefix under which most reference (visual) keys live, or None when none does."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in reference:
                prefix = ".".join(parts[:i]) + "." if i else ""
                counts[prefix] = counts.get(prefix, 0) + 1
    candidates = {p: n for p, n in counts.items() if p + VISUAL not in counts}
    return max(candidates, key=lambda p: (candidates[p], -len(p))) if candidates else None


def _validate(path, got: dict, reference: dict, what: str, allow_unexpected=False, layout: str = "") -> dict:
    """got, checked key by key against reference; float tensors as fp32, integer ones as they are."""
    problems, summary = [], []
    missing = [k for k in reference if k not in got]
    unexpected = [] if allow_unexpected else [k for k in got if k not in reference]
    if missing:
        summary.append(f"missing {len(missing)} {what} key(s): {_few(missing)}")
    if unexpected:
        summary.append(f"unexpected {len(unexpected)} {what} key(s): {_few(unexpected)}")
    for key, ref in reference.items():
        t = got.get(key)
        if t is None:
            continue
        if t.shape != ref.shape:
            problems.append(f"{key}: checkpoint has {_shape(t)}, pretrained has {_shape(ref)}")
        elif t.is_floating_point() != ref.is_floating_point():
            problems.append(f"{key}: checkpoint has dtype {t.dtype}, pretrained has {ref.dtype}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            problems.append(f"{key}: {bad} non-finite value(s) (NaN/Inf)")
    if summary or problems:
        shown = summary + problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        looks = f" (the file looks like {layout})" if layout else ""
        raise CheckpointError(f"{path}: does not match the pretrained {what}{looks}:\n  " + "\n  ".join(shown))
    return {k: got[k].detach().float() if got[k].is_floating_point() else got[k].detach() for k in reference}


def _split_visual(ckpt: Checkpoint, reference) -> tuple[str, dict]:
    prefix = _visual_prefix(ckpt.tensors, reference)
    if prefix is None:
        raise CheckpointError(f"{ckpt.path}: no visual-tower tensors (none of {_few(reference)}); it looks like "
                              f"{ckpt.layout or layouts.describe(ckpt.tensors)}, keys: {_few(ckpt.tensors)}")
    return prefix, {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}


def drop_text_tower(pretrained: PretrainedModel) -> None:
    """Free everything of the CLIP but its visual tower (the text tower's one use in a build is the zero-shot heads,
    made first): a third of ViT-B's memory, 0.5 GB of ViT-L-14's."""
    model = pretrained.model
    for name in [n for n, _ in model.named_children() if n != "visual"]:
        delattr(model, name)
    for name in [*dict(model.named_parameters(recurse=False)), *dict(model.named_buffers(recurse=False))]:
        delattr(model, name)
    pretrained.has_text = False


def visual_state(model) -> dict[str, torch.Tensor]:
    """Canonical visual keys -> tensors of an open_clip CLIP (or a PretrainedModel)."""
    if isinstance(model, PretrainedModel):
        model = model.model
    return model.visual.state_dict()


def load_visual(path, reference: dict[str, torch.Tensor], quick_gelu: bool | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's visual tower under canonical keys, checked against ``reference`` (the pretrained tower).

    Any layout of this module; CheckpointError naming the file and, as relevant, the key and both shapes, for
    missing or unexpected keys, shape or dtype-kind mismatches and NaN/Inf. With ``quick_gelu`` given, a pickled
    module whose activation says otherwise is a ConfigError.
    """
    ckpt = read_checkpoint(path)
    if quick_gelu is not None and ckpt.quick_gelu is not None:
        resolve_quick_gelu(quick_gelu, [(ckpt.quick_gelu_source, ckpt.quick_gelu)])
    _, got = _split_visual(ckpt, reference)
    for key in ckpt.from_pretrained:  # e.g. a transformers CLIPVisionModel carries no projection
        if key in reference and key not in got:
            got[key] = reference[key]
    return _validate(ckpt.path, got, reference, "visual tower", layout=ckpt.layout)


# ---------------------------------------------------------------- the pretrained model


def resolve_quick_gelu(given: bool | None, evidence: list[tuple[str, bool]]) -> bool:
    """The QuickGELU setting: the caller's or the evidence's; ConfigError on any disagreement."""
    def uses(value):
        return "QuickGELU" if value else "GELU, not QuickGELU"

    for source, value in evidence:
        if given is not None and value != bool(given):
            raise ConfigError(f"quick_gelu={bool(given)} was given, but the {source} uses {uses(value)}; "
                              "the activation must match the weights")
    values = {value for _, value in evidence}
    if len(values) > 1:
        yes = next(s for s, v in evidence if v)
        no = next(s for s, v in evidence if not v)
        raise ConfigError(f"QuickGELU evidence disagrees: the {yes} uses QuickGELU, the {no} uses GELU")
    if given is not None:
        return bool(given)
    return values.pop() if values else False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _known_architecture(config: dict) -> str | None:
    """The models/architectures.json name whose open_clip config has this image tower (for a transformers CLIP
    directory, whose own name says nothing to the catalog), or None."""
    import open_clip

    keys = ("width", "layers", "patch_size", "image_size")
    ours = {k: config["vision_cfg"].get(k) for k in keys}
    for name in catalog.architecture_names():
        known = open_clip.get_model_config(name)
        if known and known.get("embed_dim") == config["embed_dim"] and \
                {k: known["vision_cfg"].get(k) for k in keys} == ours and \
                bool(known.get("quick_gelu", False)) == bool(config.get("quick_gelu")):
            return name
    return None


def _model_source(model: str) -> tuple[str, str, dict | None, dict]:
    """(kind, name, model config, preprocess overrides) for an open_clip name, a config .json, hf-hub:, local-dir:
    or a directory (an open_clip local-dir save, or a transformers CLIP save: converted, see layouts)."""
    import open_clip

    folder = Path(model).expanduser()
    if not model.startswith(("local-dir:", "hf-hub:")) and folder.is_dir():
        if (folder / "open_clip_config.json").is_file():
            model = f"local-dir:{folder}"
        elif transformers_clip.is_transformers_dir(folder):
            config = transformers_clip.open_clip_config(transformers_clip.read_config(folder), folder / "config.json")
            name = _known_architecture(config) or folder.name
            return "transformers", name, config, transformers_clip.preprocess(folder)
        else:
            raise ConfigError(f"{folder}: a directory, but neither an open_clip save (open_clip_config.json) nor a "
                              "transformers CLIP save (config.json with model_type clip or clip_vision_model)")
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser()
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ConfigError(f"{model}: no open_clip_config.json in {folder}")
        data = _read_json(config_file)
        if not isinstance(data.get("model_cfg"), dict):
            raise ConfigError(f"{config_file}: no 'model_cfg' object (open_clip's local-dir format)")
        return "local-dir", model, data["model_cfg"], data.get("preprocess_cfg") or {}
    if model.startswith("hf-hub:"):
        return "hf-hub", model, None, {}
    if model.endswith(".json") or Path(model).is_file():
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"{model}: no such model-config file")
        data = _read_json(path)
        config = data.get("model_cfg", data)
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
            raise ConfigError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return "config", path.stem, config, data.get("preprocess_cfg") or {}
    config = open_clip.get_model_config(model)
    if config is None:
        raise ConfigError(f"{model!r} is neither an open_clip model name (see open_clip.list_models()) nor a "
                          "model-config .json file, hf-hub: or local-dir:")
    return "name", model, config, {}


def model_depth(model: str) -> int | None:
    """Blocks in the image tower, from the model's config alone (no weights read); None when only the weights tell
    (hf-hub:)."""
    kind, _, config, _ = _model_source(str(model))
    layers = (config or {}).get("vision_cfg", {}).get("layers")
    return int(layers) if isinstance(layers, int) else None


def carries_weights(model: str) -> bool:
    """A model given as a saved directory brings its own pretrained weights."""
    return not str(model).startswith(("local-dir:", "hf-hub:")) and Path(str(model)).expanduser().is_dir()


def _local_dir_weights(model: str) -> Path:
    # open_clip 3.3's own choice of weights file in a local-dir: (factory._find_checkpoint_in_dir)
    folder = Path(model[len("local-dir:"):]).expanduser()
    found = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]
    if not found:
        raise CheckpointError(f"{model}: no weights (*.safetensors, *.bin, *.pth) in {folder}")
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                 "model.pth"]
    found.sort(key=lambda p: (preferred.index(p.name) if p.name in preferred else len(preferred),
                              p.suffix != ".safetensors", p.name))
    return found[0]


def _instantiate(name: str, config: dict, quick_gelu: bool) -> torch.nn.Module:
    """An open_clip model from a config dict, class chosen as open_clip.create_model does; random weights."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.coca_model import CoCa

    cfg = copy.deepcopy(config)
    cfg["quick_gelu"] = quick_gelu
    cfg.pop("preprocess_cfg", None)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    # The checkpoint supplies every weight: never download base towers.
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom_text else CLIP
    try:
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise ConfigError(f"{name}: open_clip's {cls.__name__} does not accept this model config ({exc})") from None


def _preprocess(clip, overrides: dict) -> dict:
    """Set open_clip's preprocess cfg on a model built here (defaults + overrides, size from the tower)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), overrides or {})
    cfg["size"] = getattr(clip.visual, "image_size", cfg["size"])
    open_clip.set_model_preprocess_cfg(clip, cfg)
    return cfg


def _preprocess_summary(cfg: dict) -> dict:
    def three(v):
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3

    size = cfg.get("size", 224)
    if not isinstance(size, int):
        size = int(size[0]) if len(set(size)) == 1 else [int(s) for s in size]
    return {"image_size": size, "mean": three(cfg["mean"]), "std": three(cfg["std"]),
            "interpolation": cfg.get("interpolation") or "bicubic", "resize_mode": cfg.get("resize_mode") or "shortest"}


def _load_into(clip, ckpt: Checkpoint) -> bool:
    """Load a checkpoint into ``clip``: the visual tower always, the text side when complete. Returns has_text."""
    visual_ref = clip.visual.state_dict()
    prefix, got = _split_visual(ckpt, visual_ref)
    visual = _validate(ckpt.path, got, visual_ref, "visual tower")
    clip.visual.load_state_dict(visual)
    if not prefix.endswith(VISUAL):
        return False  # a visual-only file
    base = prefix[: -len(VISUAL)]
    text_ref = {k: v for k, v in clip.state_dict().items() if not k.startswith(VISUAL)}
    text = {k[len(base):]: v for k, v in ckpt.tensors.items() if k.startswith(base) and not k.startswith(prefix)}
    if not text_ref.keys() <= text.keys():
        return False  # e.g. task_vectors pickles: text transformer deleted, leftovers only
    for key in ("logit_scale", "logit_bias"):  # a scalar in open_clip, a 1-element vector in some exports
        if key in text and key in text_ref and text[key].numel() == text_ref[key].numel():
            text[key] = text[key].reshape(text_ref[key].shape)
    text = _validate(ckpt.path, text, text_ref, "text tower", allow_unexpected=True)
    clip.load_state_dict({**text, **{VISUAL + k: v for k, v in visual.items()}})
    return True


def load_pretrained(model: str, pretrained: str | None, quick_gelu: bool | None = None) -> PretrainedModel:
    """The pretrained CLIP.

    ``model``: an open_clip model name, a model-config .json file (built here; nothing is registered in open_clip),
    ``hf-hub:org/repo`` or ``local-dir:/path`` (a folder with open_clip's ``open_clip_config.json`` =
    ``{"model_cfg": {...}, "preprocess_cfg": {...}}`` and a weights file, chosen by open_clip's preference order).
    ``pretrained``: an open_clip tag (open_clip downloads it), a checkpoint file of any layout of this module (whole
    CLIP -> has_text; visual tower only -> has_text False), or None for hf-hub:/local-dir:, whose weights come along;
    a file given with them replaces those weights.
    """
    model, pretrained = str(model), None if pretrained is None else str(pretrained)
    kind, name, config, preprocess_overrides = _model_source(model)
    if kind == "hf-hub":
        config = _hub_config(model)
    tag, ckpt = _pretrained_weights(model, kind, name, pretrained)
    qg = resolve_quick_gelu(quick_gelu, _quick_gelu_evidence(model, name, config, tag, ckpt))
    if ckpt is None:  # a tag, or hf-hub: with its own weights: open_clip downloads and loads the whole CLIP
        clip, preprocess = _create_with_weights(name, tag, qg)
        has_text = True
    else:
        clip = _instantiate(name, config, qg)
        preprocess = _preprocess(clip, preprocess_overrides)
        has_text = _load_into(clip, ckpt)
    clip = clip.float().eval().requires_grad_(False)
    return PretrainedModel(model=clip, name=name, pretrained=pretrained or (str(ckpt.path) if ckpt else model),
                           quick_gelu=qg, config={**copy.deepcopy(config), "quick_gelu": qg}, has_text=has_text,
                           preprocess=_preprocess_summary(preprocess))


def _hub_config(model: str) -> dict:
    import open_clip

    try:
        return open_clip.get_model_config(model)
    except Exception as exc:
        raise CheckpointError(f"{model}: could not fetch its open_clip config from the Hugging Face Hub (no "
                              f"network? use local-dir: or a config .json with a weights file): {exc}") from None


def _pretrained_weights(model: str, kind: str, name: str, pretrained) -> tuple[str | None, Checkpoint | None]:
    """(an open_clip pretrained tag, or a checkpoint read from a file): where the pretrained weights come from."""
    import open_clip

    if pretrained is not None:
        if kind == "name" and open_clip.get_pretrained_cfg(name, pretrained):
            return pretrained, None
        if Path(pretrained).expanduser().is_file() or Path(pretrained).expanduser().is_dir():
            return None, read_checkpoint(pretrained)
        if "/" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES or kind != "name":
            raise CheckpointError(f"{pretrained}: no such file" + (
                "" if kind == "name" else f" (pretrained tags exist only for open_clip model names, not {model})"))
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise CheckpointError(f"{pretrained!r} is neither a file nor an open_clip pretrained tag for {name} "
                              f"(tags: {', '.join(tags) or 'none'})")
    if kind == "local-dir":
        return None, read_checkpoint(_local_dir_weights(model))
    if kind == "transformers":
        return None, read_checkpoint(Path(model).expanduser())
    if kind != "hf-hub":
        raise ConfigError(f"{model}: give pretrained weights (an open_clip tag or a checkpoint file)")
    return None, None


def _quick_gelu_evidence(model: str, name: str, config: dict | None, tag: str | None,
                         ckpt: Checkpoint | None) -> list[tuple[str, bool]]:
    """What the model name, its config, the pretrained tag and the checkpoint each say about QuickGELU."""
    import open_clip

    evidence = []
    if name.endswith("-quickgelu"):
        evidence.append((f"model name {name!r}", True))
    elif config and "quick_gelu" in config:
        evidence.append((f"model config of {model}", bool(config["quick_gelu"])))
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        tag_quick_gelu = tag in catalog.quick_gelu_tags() or bool(tag_cfg.get("quick_gelu"))
        evidence.append((f"pretrained tag {tag!r}", tag_quick_gelu))
    if ckpt is not None and ckpt.quick_gelu is not None:
        evidence.append((ckpt.quick_gelu_source, ckpt.quick_gelu))
    return evidence


def _create_with_weights(name: str, tag: str | None, quick_gelu: bool) -> tuple[torch.nn.Module, dict]:
    """open_clip's model with the weights it downloads itself (a tag, or hf-hub:), and its preprocessing."""
    import open_clip

    try:
        clip = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu, require_pretrained=True)
    except Exception as exc:
        what = f"the pretrained weights {tag!r}" if tag else "its weights"
        raise CheckpointError(f"{name}: open_clip could not download or load {what} (no network? give a "
                              f"checkpoint file instead): {exc}") from None
    return clip, open_clip.get_model_preprocess_cfg(clip)


# ---------------------------------------------------------------- finding files in a checkpoint tree


def _bases(root, model_name: str | None) -> list[Path]:
    """<root>/<model_name> (and without -quickgelu) where such folders exist, then <root>."""
    root = Path(root).expanduser()
    bases = []
    if model_name and ":" not in model_name and "/" not in model_name and "\\" not in model_name:
        for name in (model_name, model_name.removesuffix("-quickgelu")):
            if (root / name).is_dir() and root / name not in bases:
                bases.append(root / name)
    return bases + [root]


def _task_dirs(task: str) -> list[str]:
    return [task] if task.endswith("Val") else [f"{task}Val", task]


def _task_sources(base: Path, task: str) -> list[Path]:
    """Every checkpoint for ``task`` directly under ``base``, in preference order: the first weights file of the
    folders ``<Task>Val`` then ``<Task>`` (the TSV/MASS authors' ``Val`` checkpoints are those behind their published
    numbers, so a tree holding both means ``Val``), then flat files ``<Task>.safetensors`` / ``.pt`` / ``.bin`` /
    ``.pth``."""
    found = []
    for folder in _task_dirs(task):
        hits = [base / folder / f for f in TASK_FILES if (base / folder / f).is_file()]
        other = next((h for h in hits[1:] if not _same_save(hits[0].name, h.name)), None)
        if other is not None:
            raise CheckpointError(f"task {task}: two checkpoints, {hits[0]} and {other}; keep one, or name the one to "
                                  f"use in a build config (--config: tasks: {{{task}: {{checkpoint: PATH}}}})")
        if hits:
            found.append(hits[0])
    return found + [base / f"{task}{suffix}" for suffix in FLAT_SUFFIXES if (base / f"{task}{suffix}").is_file()]


# File names that one save writes in two formats (hub repos often carry both): not two checkpoints.
SAME_SAVE = ({"finetuned.pt", "finetuned.safetensors"}, {"pytorch_model.bin", "model.safetensors"},
             {"open_clip_model.safetensors", "open_clip_pytorch_model.bin"})


def _same_save(a: str, b: str) -> bool:
    return any({a, b} <= names for names in SAME_SAVE)


def searched(root, model_name: str | None = None) -> str:
    """What the finder looks for, for messages."""
    folders = " and ".join(str(b) for b in _bases(root, model_name))
    return (f"searched {folders} for a folder <Task>Val or <Task> holding one of {', '.join(TASK_FILES)}, "
            f"or a file <Task>{'/'.join(FLAT_SUFFIXES)}")


def find_task_checkpoints(root, tasks: list[str], model_name: str | None = None) -> dict[str, Path]:
    """Task -> fine-tuned checkpoint file. MissingCheckpoints lists every task without one, what was searched and
    which tasks were found; a task with two checkpoints no rule orders is refused naming both.

    Rule: the first hit, searching ``<root>/<model_name>`` before ``<root>``; in each, the folder ``<Task>Val`` (the
    TSV/MASS authors' checkpoints, those behind their published numbers) before ``<Task>``, then a flat file
    ``<Task>.safetensors|.pt|.bin|.pth``; in a folder the first of TASK_FILES (task_vectors names, then the
    transformers and open_clip save names).
    """
    found, missing = {}, []
    for task in tasks:
        for base in _bases(root, model_name):
            sources = _task_sources(base, task)
            folders = [p for p in sources if p.parent != base]
            flats = [p for p in sources if p.parent == base]
            if flats and (folders or len(flats) > 1):
                first, second = (folders + flats)[:2]
                raise CheckpointError(f"task {task}: two checkpoints, {first} and {second}; keep one, or name the one "
                                      f"to use in a build config (--config: tasks: {{{task}: {{checkpoint: PATH}}}})")
            if sources:
                found[task] = sources[0]
                break
        else:
            missing.append(task)
    if missing:
        others = [t for t in discover_tasks(root, model_name) if t not in tasks]
        raise MissingCheckpoints(root, missing, searched(root, model_name), others)
    return found


def find_pretrained(root, model_name: str | None = None) -> Path | None:
    """zeroshot.pt / zeroshot.safetensors under <root>/<model_name> or <root>, else None."""
    return next((base / f for base in _bases(root, model_name) for f in PRETRAINED_FILES if (base / f).is_file()), None)


def _not_a_task(name: str) -> bool:
    """Flat files that are not fine-tunes: the pretrained, heads, and the weight names of saves."""
    stem = name.rsplit(".", 1)[0]
    return (name in PRETRAINED_FILES or name in TASK_FILES or stem.startswith(("head_", "zeroshot", "open_clip_",
                                                                                "epoch_"))
            or stem in ("pytorch_model", "model", "optimizer", "training_args"))


def discover_tasks(root, model_name: str | None = None) -> list[str]:
    """Sorted task names with a checkpoint under the tree: folders holding a weights file (a ``<Task>Val`` folder
    counts as task ``<Task>``) and flat ``<Task>.safetensors|.pt|.bin|.pth`` files."""
    names = set()
    for base in _bases(root, model_name):
        if not base.is_dir():
            continue
        for entry in base.iterdir():
            if entry.is_dir() and any((entry / f).is_file() for f in TASK_FILES):
                name = entry.name
                names.add(name[:-3] if name.endswith("Val") and len(name) > 3 else name)
            elif entry.is_file() and entry.suffix in FLAT_SUFFIXES and not _not_a_task(entry.name):
                names.add(entry.stem)
    return sorted(names)


def find_heads(root, tasks, model_name: str | None = None) -> dict[str, Path]:
    """Task -> head_<Task>(.pt|.safetensors) where present (beside the task folders, or inside one)."""
    found = {}
    for task in tasks:
        candidates = [p for base in _bases(root, model_name) for d in _task_dirs(task) for s in HEAD_SUFFIXES
                      for p in (base / f"head_{d}{s}", base / d / f"head_{d}{s}")]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is not None:
            found[task] = hit
    return found


def load_head(path) -> torch.Tensor:
    """A classification head's weight (C, D), fp32: a pickled ClassificationHead or a {"weight": ...} file."""
    ckpt = read_checkpoint(path)
    key = "weight" if "weight" in ckpt.tensors else None
    if key is None:
        weights = [k for k, v in ckpt.tensors.items() if k.endswith(".weight") and v.ndim == 2]
        if len(weights) != 1:
            raise CheckpointError(f"{ckpt.path}: no head 'weight' tensor among its keys: {_few(ckpt.tensors)}")
        key = weights[0]
    weight = ckpt.tensors[key]
    if weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"{ckpt.path}: head {key} is {_shape(weight)} {weight.dtype}, "
                              "expected (classes, dim) float")
    if not bool(torch.isfinite(weight).all()):
        raise CheckpointError(f"{ckpt.path}: head {key} has non-finite values (NaN/Inf)")
    bias = ckpt.tensors.get(key[: -len("weight")] + "bias")
    if bias is not None and bool((bias != 0).any()):
        raise CheckpointError(f"{ckpt.path}: the head has a nonzero bias; mass-export heads are weight-only")
    if isinstance(ckpt.root, unpickle.StandIn) and ckpt.root.pickled_dict().get("normalize") is False:
        raise CheckpointError(f"{ckpt.path}: the head has normalize=False; mass-export heads L2-normalise features")
    return weight.detach().float()


__all__ = ["Checkpoint", "PretrainedModel", "carries_weights", "discover_tasks", "model_depth", "searched", "find_heads", "find_pretrained", "find_task_checkpoints",
           "load_head", "load_pretrained", "load_visual", "read_checkpoint", "resolve_quick_gelu", "visual_state"]
