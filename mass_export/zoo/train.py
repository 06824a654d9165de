"""Build the demo zoo: a tiny open_clip CLIP "pretrained" here, zero-shot heads, one visual fine-tune per task.

Everything is seeded and runs with the recipe's torch thread count (1 by default: on a shared 2-core machine one
thread was 4-6x faster per step than two). The result is cached under ``cache_dir`` keyed by the recipe's hash and
written atomically (temp dir + rename), so a second call returns at once.

Layout (readable like any user's checkpoints)::

    <root>/tiny-clip.json                 open_clip model config
    <root>/zeroshot.safetensors           whole CLIP state dict (open_clip keys)
    <root>/<Task>/finetuned.safetensors   fine-tuned visual tower, keys "visual.*"
    <root>/head_<Task>.safetensors        {"weight": (C, D)}: the zero-shot head used for fine-tuning
    <root>/zoo.json                       recipe, tasks, seed, wall time, per-task accuracies
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mass_export.zoo.datasets import class_names, load_split, task_info, templates
from mass_export.zoo.recipe import load_recipe, recipe_hash

# open_clip's default (OpenAI) normalisation: the zoo model keeps the default preprocessing of a config file.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ZooResult:
    root: Path
    model_config: Path
    tasks: list[str]
    pretrained: Path
    info: dict = field(default_factory=dict, repr=False)

    def finetuned(self, task: str) -> Path:
        return self.root / task / "finetuned.safetensors"

    def head(self, task: str) -> Path:
        return self.root / f"head_{task}.safetensors"


def default_cache_dir() -> Path:
    env = os.environ.get("MASS_EXPORT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mass-export"


# ---------------------------------------------------------------- model and data helpers


def create_model(config: dict):
    """A fresh open_clip CLIP from a model config dict (as the JSON files in open_clip's model_configs)."""
    from open_clip.model import CLIP

    kwargs = {k: v for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}
    return CLIP(**kwargs)


def tokenizer_for_config(config: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), as open_clip's preprocessing at the native size."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Training-only augmentation: random translation by up to ``shift`` px (edge padding)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dy = rng.integers(0, 2 * shift + 1, size=n)
    dx = rng.integers(0, 2 * shift + 1, size=n)
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _limited(images, labels, limit):
    """A fixed, class-mixed subset of ``limit`` samples (for small test recipes)."""
    if limit and limit < len(labels):
        keep = np.sort(np.random.default_rng(12345).permutation(len(labels))[:limit])
        return images[keep], labels[keep]
    return images, labels


def task_data(recipe: dict, task: str, split: str):
    images, labels = load_split(task, split, recipe["image_size"])
    return _limited(images, labels, recipe["limit"].get(split))


def _schedule(optimizer, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _bar(total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the three training phases


def pretrain(model, recipe: dict, tokenizer, progress=True) -> list[float]:
    """Contrastive "pretraining" of both towers: each image against every class prompt of every task.

    Batches are balanced over tasks; each step fills every class name into one random template of its task.
    """
    cfg = recipe["pretrain"]
    tasks = recipe["tasks"]
    rng = np.random.default_rng(recipe["seed"] * 1000 + 1)
    data = [task_data(recipe, task, "pretrain") for task in tasks]
    offsets = np.cumsum([0] + [len(class_names(t)) for t in tasks])
    names = [class_names(t) for t in tasks]
    temps = [templates(t) for t in tasks]
    domain_prob = float(cfg.get("domain_caption_prob", 0.0))
    domains = [task_info(t).get("domain", f"a picture from {t}.") for t in tasks]
    # The text tower sees ~100 distinct tokens: freezing the (random) token embedding saves a 49408-row update
    # per step (~30% of the step time) and changes little.
    model.token_embedding.weight.requires_grad_(not cfg.get("freeze_token_embedding", False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = _schedule(optimizer, cfg["steps"], cfg["warmup"])
    per_task = max(1, cfg["batch_size"] // len(tasks))
    losses = []
    model.train()
    with _bar(cfg["steps"], "zoo: pretrain", progress) as bar:
        for _ in range(cfg["steps"]):
            images, targets = [], []
            for t, (x, y) in enumerate(data):
                pick = rng.integers(0, len(x), size=per_task)
                images.append(x[pick])
                targets.append(y[pick] + offsets[t])
            images = np.concatenate(images)
            if cfg.get("augment", False):
                images = augment(images, rng)
            prompts = [temps[t][rng.integers(len(temps[t]))].format(c) for t in range(len(tasks)) for c in names[t]]
            targets = np.concatenate(targets)
            if domain_prob > 0:
                # Some captions name only the domain ("a close-up photo of a texture."), as web captions often
                # do: the base learns what kind of image it sees more than which class (lower zero-shot).
                prompts += domains
                task_of = np.searchsorted(offsets, targets, side="right") - 1
                targets = np.where(rng.random(len(targets)) < domain_prob, offsets[-1] + task_of, targets)
            image_features = F.normalize(model.encode_image(to_tensor(images)), dim=-1)
            text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            loss = F.cross_entropy(logits, torch.from_numpy(targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.token_embedding.weight.requires_grad_(True)
    model.eval()
    return losses


def finetune(model, head: torch.Tensor, recipe: dict, task: str, task_index: int, progress=True) -> list[float]:
    """Fine-tune ``model.visual`` on one task with the frozen zero-shot head (AdamW, warmup + cosine)."""
    cfg = dict(recipe["finetune"])
    cfg.update(cfg.pop("per_task", {}).get(task, {}))
    rng = np.random.default_rng(recipe["seed"] * 1000 + 100 + task_index)
    torch.manual_seed(recipe["seed"] * 1000 + 100 + task_index)
    x, y = task_data(recipe, task, "finetune")
    visual = model.visual
    if cfg.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(visual.parameters(), lr=cfg["lr"], momentum=cfg.get("momentum", 0.9),
                                    weight_decay=cfg["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(visual.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = _schedule(optimizer, cfg["steps"], cfg["warmup"])
    losses = []
    visual.train()
    with _bar(cfg["steps"], f"zoo: fine-tune {task}", progress) as bar:
        for _ in range(cfg["steps"]):
            pick = rng.integers(0, len(x), size=cfg["batch_size"])
            images = x[pick]
            if cfg.get("augment", True):
                images = augment(images, rng)
            logits = F.normalize(visual(to_tensor(images)), dim=-1) @ head.T
            loss = F.cross_entropy(logits, torch.from_numpy(y[pick]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    visual.eval()
    return losses


@torch.no_grad()
def accuracy(visual, head: torch.Tensor, images: np.ndarray, labels: np.ndarray, batch: int = 512) -> float:
    visual.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = F.normalize(visual(to_tensor(images[start : start + batch])), dim=-1) @ head.T
        correct += int((logits.argmax(1).numpy() == labels[start : start + batch]).sum())
    return 100.0 * correct / max(1, len(images))


# ---------------------------------------------------------------- the builder


def _save(tensors: dict, path: Path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


def _build_into(out: Path, recipe: dict, digest: str, progress: bool, base_cache=None) -> dict:
    from mass_export.merging.zeroshot import zero_shot_head

    start, cpu_start = time.perf_counter(), time.process_time()
    seed = int(recipe["seed"])
    torch.manual_seed(seed)
    config = recipe["model_config"]
    model = create_model(config)
    tokenizer = tokenizer_for_config(config)
    base_file = None
    if base_cache is not None:
        # Recipes that differ only after pretraining (fine-tune settings) share the pretrained base.
        key = {k: recipe[k] for k in ("seed", "model_config", "image_size", "tasks", "pretrain", "limit")}
        base_file = Path(base_cache) / f"base-{recipe_hash(key)[:16]}.safetensors"
    if base_file is not None and base_file.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(base_file)))
        model.eval()
        losses = {"pretrain": [float("nan")]}
    else:
        losses = {"pretrain": pretrain(model, recipe, tokenizer, progress)}
        if base_file is not None:
            base_file.parent.mkdir(parents=True, exist_ok=True)
            _save(model.state_dict(), base_file.with_suffix(".tmp"))
            os.replace(base_file.with_suffix(".tmp"), base_file)
    base_seconds = time.perf_counter() - start

    (out / "tiny-clip.json").write_text(json.dumps(config, indent=4) + "\n")
    _save(model.state_dict(), out / "zeroshot.safetensors")
    pretrained_visual = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}

    heads = {}
    for task in recipe["tasks"]:
        heads[task] = zero_shot_head(model, tokenizer, class_names(task), templates(task)).detach().float()
        _save({"weight": heads[task]}, out / f"head_{task}.safetensors")

    results = {}
    for index, task in enumerate(recipe["tasks"]):
        test_x, test_y = task_data(recipe, task, "test")
        model.visual.load_state_dict(pretrained_visual)
        zero_shot = accuracy(model.visual, heads[task], test_x, test_y)
        losses[task] = finetune(model, heads[task], recipe, task, index, progress)
        (out / task).mkdir()
        _save({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, out / task / "finetuned.safetensors")
        results[task] = {"zero_shot": zero_shot, "finetuned": accuracy(model.visual, heads[task], test_x, test_y),
                         "test_samples": int(len(test_y)), "final_loss": losses[task][-1]}
    wall = time.perf_counter() - start
    info = {
        "format": "mass-export-zoo/1",
        "recipe": recipe,
        "recipe_hash": digest,
        # What was trained: another machine's float rounding trains slightly different weights (another hash).
        "weights_hash": weights_hash(out),
        "tasks": list(recipe["tasks"]),
        "seed": seed,
        # The block the recipe study found best for routing this zoo (pass it as the build's routing layer).
        "routing_layer": recipe.get("routing_layer"),
        "threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 2),
        # CPU seconds of this process: ~ the wall time on an idle machine with 1 thread, whatever else runs here.
        "cpu_time_s": round(time.process_time() - cpu_start, 2),
        "pretrain_time_s": round(base_seconds, 2),
        "pretrain_final_loss": losses["pretrain"][-1],
        "accuracy": results,
        "versions": {"torch": torch.__version__, "open_clip": _open_clip_version()},
    }
    (out / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def weights_hash(root: Path) -> str:
    """sha256 over the zoo's safetensors files (relative path and bytes, in sorted order)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.safetensors")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _open_clip_version() -> str:
    try:
        from importlib.metadata import version

        return version("open_clip_torch")
    except Exception:  # pragma: no cover
        return "unknown"


def _result(root: Path, info: dict) -> ZooResult:
    return ZooResult(root=root, model_config=root / "tiny-clip.json", tasks=list(info["tasks"]),
                     pretrained=root / "zeroshot.safetensors", info=info)


def build_zoo(recipe=None, cache_dir: Path | None = None, progress: bool = True, share_base: bool = False) -> ZooResult:
    """Build (or return the cached) demo zoo for ``recipe`` (None = models/zoo/default.json).

    ``share_base``: keep the pretrained base under ``cache_dir/bases`` and reuse it for recipes that differ only
    in their fine-tunes (for recipe studies; the result is identical, the wall time then excludes pretraining).
    """
    resolved = load_recipe(recipe)
    digest = recipe_hash(resolved)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"zoo-{resolved['name']}-{digest[:16]}"
    done = root / "zoo.json"
    if done.is_file():
        return _result(root, json.loads(done.read_text()))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=cache))
    try:
        with torch_threads(resolved.get("threads")):
            info = _build_into(tmp, resolved, digest, progress, cache / "bases" if share_base else None)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, root)
        except OSError:
            if not done.is_file():  # not a concurrent builder that finished first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(root, json.loads(done.read_text()) if done.is_file() else info)
