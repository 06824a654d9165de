"""The torch reference (early exit, grouping, cached task-set weights) against the naive formulation."""

import pytest
import torch
from open_clip.model import CLIP

from mass_export.merging import merge
from mass_export.merging.reference import MassReference, Method
from mass_export.nn.tower import FullTower, run_with

CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = CLIP(**CONFIG).eval()
    pre = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    finetuned = [{k: v + 0.05 * torch.randn_like(v) for k, v in pre.items()} for _ in range(4)]
    factors = merge.task_factors([merge.task_delta(pre, f) for f in finetuned])
    heads = [torch.nn.functional.normalize(torch.randn(c, 32), dim=-1) * 100 for c in (3, 5, 4, 2)]
    return MassReference(model.visual, pre, factors, merge.base_tasks(factors), heads, Method(routing_layer=2),
                         cache_size=2)


def test_tower_with_own_weights_is_open_clip():
    model = CLIP(**CONFIG).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run_with(FullTower(model.visual), dict(model.visual.state_dict()), x), model.visual(x))


def test_early_exit_and_grouping_equal_the_naive_two_pass(reference):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fast, naive = reference.predict(x), reference.predict_naive(x)
    assert [p.task_set for p in fast] == [p.task_set for p in naive]
    assert [(p.task_index, p.class_index) for p in fast] == [(p.task_index, p.class_index) for p in naive]
    worst = max(float((p.logits - q.logits).abs().max()) for p, q in zip(fast, naive))
    # Same weights, same groups: only the early exit and the cache differ, which must not change a bit.
    print(f"reference vs naive two-pass: max |logit diff| = {worst:.2e}")
    assert worst <= 1e-6
    assert len({p.task_set for p in fast}) >= 2, "the test should exercise several task sets"


def test_task_set_cache_is_bounded(reference):
    for task_set in [(0,), (1,), (2,), (0, 1)]:
        reference.task_set_weights(task_set)
    assert list(reference.cache) == [(2,), (0, 1)]


def test_single_task_set_is_pretrained_plus_its_update(reference):
    weights = reference.task_set_weights((1,))
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    f = reference.factors
    expected = reference.pretrained[key] + (f.U[key][1] * f.s[key][1]) @ f.V[key][1]
    assert (weights[key] - expected).abs().max() < 1e-5
    assert torch.allclose(weights["conv1.weight"], reference.pretrained["conv1.weight"] + f.whole["conv1.weight"][1])


def test_released_first_pass_is_made_again_identically(reference):
    """Validation releases theta_MT before the second pass; routing afterwards must make the same weights again."""
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in reference.theta_mt.items()}
    probs, _, sets = reference.route(x)
    reference.release_first_pass()
    assert reference._theta_mt is None
    again_probs, _, again_sets = reference.route(x)
    assert again_sets == sets
    assert torch.equal(again_probs, probs)
    assert all(torch.equal(reference.theta_mt[k], before[k]) for k in before)


def test_cache_evicts_before_it_merges(reference, monkeypatch):
    """A full cache drops its oldest set before the new one is merged: never cache_size + 1 towers alive at once."""
    for task_set in [(0,), (1,)]:
        reference.task_set_weights(task_set)
    held = []
    real = merge.merged_tower

    def counting(*args, **kwargs):
        held.append(len(reference.cache))
        return real(*args, **kwargs)

    monkeypatch.setattr("mass_export.merging.reference.merged_tower", counting)
    reference.task_set_weights((2, 3))
    assert held == [1]
    assert list(reference.cache) == [(1,), (2, 3)]
