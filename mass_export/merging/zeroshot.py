"""Zero-shot classification heads from a CLIP text tower (open_clip tokenizers)."""

from __future__ import annotations

import torch


def tokenizer_for(model_name: str, context_length: int):
    import open_clip

    if model_name in open_clip.list_models():
        return open_clip.get_tokenizer(model_name)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


@torch.no_grad()
def zero_shot_head(model, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D): per class, the re-normalised mean of its normalised template embeddings, times logit_scale.exp()."""
    rows = []
    for name in classnames:
        texts = tokenizer([template.format(name) for template in templates])
        embeddings = torch.nn.functional.normalize(model.encode_text(texts).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(embeddings.mean(dim=0), dim=0))
    return torch.stack(rows) * model.logit_scale.exp().float()
