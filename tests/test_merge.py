"""The merge math against independent forms. Max differences are printed (pytest -s) and bounded."""

import numpy as np
import pytest
import torch

from mass_export.core import lowrank
from mass_export.merging import merge
from mass_export.nn import routing
from mass_export.core.errors import ConfigError
from mass_export.core.taskweights import StoredTasks, task_set_weights

torch.manual_seed(0)


def random_factors(num_tasks, m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(m, n, generator=g, dtype=torch.float64) / np.sqrt(n) for _ in range(num_tasks)]
    parts = [merge.truncated_svd(d, k) for d in deltas]
    U, s, V = (torch.stack(p) for p in zip(*parts))
    return deltas, U, s, V


def test_truncated_svd_is_the_best_rank_k_approximation():
    deltas, U, s, V = random_factors(1, 48, 32, 8)
    full = torch.linalg.svd(deltas[0].float())
    # Eckart-Young: the residual's spectral norm is the (k+1)-th singular value.
    residual = deltas[0].float() - merge.reconstruction(U, s, V)[0]
    assert abs(torch.linalg.matrix_norm(residual, 2) - full.S[8]) < 1e-4
    assert torch.allclose(U[0].T @ U[0], torch.eye(8), atol=1e-5)
    assert torch.allclose(V[0] @ V[0].T, torch.eye(8), atol=1e-5)


def finetune_like_delta(m, n, seed):
    """A real-size delta with a decaying spectrum plus dense noise (fine-tunes are like this; deltas ~1e-3)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    left = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    spectrum = 0.05 * torch.arange(1, r + 1, dtype=torch.float64) ** -0.7
    noise = 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return ((left * spectrum) @ right.T + noise).float()


# ViT-B-16 (width 768, mlp 3072) at T=8 and ViT-L-14 (width 1024) at T=20: square, tall and wide keys.
@pytest.mark.parametrize("m,n,num_tasks", [(768, 768, 8), (3072, 768, 8), (768, 3072, 8), (1024, 1024, 20),
                                           (768, 512, 14)])
def test_gram_truncation_equals_the_full_svd(m, n, num_tasks):
    k = merge.truncation_rank((m, n), num_tasks)
    for seed, delta in enumerate([finetune_like_delta(m, n, 1), torch.randn(m, n, generator=torch.Generator()
                                                                               .manual_seed(2)) * 1e-3]):
        U, s, V = merge.top_singular_triplets(delta, k)
        assert (U.shape, s.shape, V.shape) == ((m, k), (k,), (k, n))
        assert U.dtype == s.dtype == V.dtype == torch.float32
        ref = merge.truncated_svd(delta, k)
        exact = torch.linalg.svd(delta.double(), full_matrices=False)
        exact_rec = (exact.U[:, :k] * exact.S[:k]) @ exact.Vh[:k]
        ours = (U.double() * s.double()) @ V.double()
        diff = float((ours - ((ref[0].double() * ref[1].double()) @ ref[2].double())).abs().max())
        diff64 = float((ours - exact_rec).abs().max())
        print(f"{m}x{n} T={num_tasks} k={k} delta {seed}: max |Gram - fp32 SVD| = {diff:.2e}, "
              f"max |Gram - fp64 SVD| = {diff64:.2e} (max |delta_k| {float(exact_rec.abs().max()):.1e})")
        assert np.isfinite(diff) and diff <= 1e-5
        assert diff64 <= 1e-5
        assert float((s.double() - exact.S[:k]).abs().max()) <= 1e-6 * float(exact.S[0])
        assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-5) and torch.allclose(V @ V.T, torch.eye(k), atol=1e-5)


def test_gram_truncation_of_a_rank_deficient_update_stays_orthonormal():
    delta = torch.zeros(96, 64)
    delta[:3] = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))  # rank 3 < k = 8
    U, s, V = merge.top_singular_triplets(delta, 8)
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5) and torch.allclose(V @ V.T, torch.eye(8), atol=1e-5)
    assert torch.allclose((U * s) @ V, delta, atol=1e-5)
    assert merge.truncate_task({"w": torch.zeros(32, 16)}, 4)["w"][1].abs().max() == 0


def test_non_finite_update_names_the_key():
    from mass_export.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="blocks.0.w: the task update is not finite"):
        merge.truncate_task({"blocks.0.w": torch.full((8, 4), float("nan"))}, 2)


@pytest.mark.parametrize("num_tasks,m,n,k", [(2, 64, 64, 32), (3, 96, 32, 10), (8, 48, 48, 6), (4, 40, 24, 6)])
def test_gram_form_equals_polar_form(num_tasks, m, n, k):
    _, U, s, V = random_factors(num_tasks, m, n, k)
    polar = merge.tsvm(U, s, V).numpy()
    gram = lowrank.tsvm_factors(U.numpy(), s.numpy(), V.numpy())
    diff = np.abs(gram[0] @ gram[1] - polar).max()
    print(f"T={num_tasks} {m}x{n} k={k}: max |Gram - polar| = {diff:.2e}")
    assert diff < 1e-10


def test_gram_form_handles_rank_deficient_concatenation():
    # T*k = 4*8 = 32 > n = 24: V_cat has dependent rows; the pseudo-inverse square root must match polar.
    _, U, s, V = random_factors(4, 40, 24, 8)
    diff = np.abs(lowrank.tsvm_delta(U.numpy(), s.numpy(), V.numpy()) - merge.tsvm(U, s, V).numpy()).max()
    print(f"rank-deficient: max |Gram - polar| = {diff:.2e}")
    assert diff < 1e-5


def test_single_task_tsvm_is_its_truncated_update():
    _, U, s, V = random_factors(1, 32, 48, 12)
    diff = (merge.tsvm(U, s, V) - merge.reconstruction(U.double(), s.double(), V.double())[0]).abs().max()
    # U, V come from an fp32 SVD: orthonormal to ~1e-7, which is what the polar step corrects.
    print(f"single task: max |TSV-M - truncated| = {diff:.2e}")
    assert diff < 1e-5


def test_truncation_rank_defaults_and_refusal():
    assert merge.truncation_rank((768, 768), 8) == 96
    assert merge.truncation_rank((3072, 768), 14) == 54
    assert merge.truncation_rank((768, 768), 20) == 38
    assert merge.truncation_rank((1024, 4096), 14) == 73
    with pytest.raises(ConfigError, match="at most 197 tasks"):
        merge.truncation_rank((197, 768), 200, key="positional_embedding")


def test_split_qkv_blocks_are_rows():
    weight = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
    parts = merge.split_qkv({"transformer.resblocks.0.attn.in_proj_weight": weight})
    assert torch.equal(torch.cat([parts[f"transformer.resblocks.0.attn.in_proj_weight.{p}"] for p in "qkv"]), weight)


def test_no_redundancy_skips_a_near_copy():
    _, U, s, V = random_factors(3, 32, 32, 4)
    U[2], s[2], V[2] = U[0], s[0] * 2, V[0]  # task 2 points the same way as task 0
    assert merge.non_redundant_tasks(U, s, V, 0.3) == [0, 1]
    assert merge.non_redundant_tasks(U, s, V, 1.01) == [0, 1, 2]


def test_numpy_task_set_weights_equal_torch_merge():
    g = torch.Generator().manual_seed(1)
    pre = {"transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16, generator=g),
           "proj": torch.randn(16, 8, generator=g), "ln.weight": torch.randn(16, generator=g),
           "conv1.weight": torch.randn(16, 3, 2, 2, generator=g)}
    deltas = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(4)]
    factors = merge.task_factors(deltas, split=True)
    bases = merge.base_tasks(factors, "no-redundancy", 0.3)
    flat = merge.factors_to_flat(factors, bases)
    stored = StoredTasks.from_flat({k: v.numpy() for k, v in pre.items()}, {k: v.numpy() for k, v in flat.items()},
                                   {k: v.numpy() for k, v in factors.whole.items()}, alpha=0.7)
    worst = 0.0
    for task_set in [(0,), (1, 3), (0, 1, 2), (0, 1, 2, 3)]:
        ref = merge.merged_tower(pre, factors, task_set, alpha=0.7)
        got = task_set_weights(stored, task_set)
        worst = max(worst, max(float(np.abs(got[k] - ref[k].numpy()).max()) for k in pre))
    ref = merge.merged_tower(pre, factors, range(4), alpha=0.7, per_key_tasks=bases)
    got = task_set_weights(stored, range(4), base=True)
    worst = max(worst, max(float(np.abs(got[k] - ref[k].numpy()).max()) for k in pre))
    print(f"numpy Gram rebuild vs torch polar merge: max |diff| = {worst:.2e}")
    assert worst < 1e-5


def test_input_in_a_task_subspace_routes_to_it():
    _, _, _, V = random_factors(4, 64, 64, 8)
    V = V.float()
    g = torch.Generator().manual_seed(2)
    z = torch.stack([V[i].T @ torch.randn(8, generator=g) for i in range(4)])  # sample i lies in task i's row space
    residuals = routing.projection_residuals(z, V)
    assert torch.all(residuals.diagonal() < 1e-4)
    probs = routing.routing_probabilities(residuals)
    assert routing.select_tasks(probs, 0.2, 3) == [(0,), (1,), (2,), (3,)] or all(
        i in s for i, s in enumerate(routing.select_tasks(probs, 0.2, 3)))
    assert torch.equal(probs.argmax(dim=1), torch.arange(4))


def test_router_probability_and_selection_forms_agree():
    residuals = torch.rand(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    p_torch = routing.routing_probabilities(residuals, tau=0.5)
    p_numpy = lowrank.zscore_softmax(residuals.numpy(), tau=0.5)
    print(f"router probs torch vs numpy: max |diff| = {np.abs(p_torch.numpy() - p_numpy).max():.2e}")
    assert np.abs(p_torch.numpy() - p_numpy).max() < 1e-6
    assert routing.select_tasks(p_torch, 0.2, 3) == lowrank.select_task_sets(p_torch.numpy(), 0.2, 3)
    # The rule itself: above eta, at most top_k, else argmax.
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.15, 0.15, 0.4, 0.3], [0.25, 0.25, 0.25, 0.25],
                          [0.19, 0.19, 0.19, 0.43]])
    assert routing.select_tasks(probs, 0.2, 3) == [(0, 1), (2, 3), (0, 1, 2), (3,)]
    assert routing.select_tasks(torch.full((1, 6), 1 / 6), 0.2, 3) == [(0,)]
    assert routing.select_tasks(probs, 0.2, 1) == [(0,), (2,), (0,), (3,)]


def test_two_tasks_always_pick_exactly_one():
    probs = routing.routing_probabilities(torch.rand(100, 2, generator=torch.Generator().manual_seed(4)))
    assert all(len(s) == 1 for s in routing.select_tasks(probs, 0.2, 3))
