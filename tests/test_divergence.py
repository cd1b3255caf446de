"""Full-vocabulary divergences and entropy against per-token float64 references in plain Python."""

import math

import pytest
import torch

from efficient_rl.algos.divergence import DIVERGENCES, token_divergence, token_entropy

KINDS = ["reverse_kl", "forward_kl", "jsd"]
ROWS, VOCAB = 10, 7


def logits_pair(seed, rows=ROWS, vocab=VOCAB, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator) * scale
    teacher = torch.randn(rows, vocab, generator=generator) * scale
    return student, teacher


def softmax(row):
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def reference(student_row, teacher_row, kind, beta=0.5):
    p, q = softmax(student_row), softmax(teacher_row)
    if kind == "reverse_kl":
        return kl(p, q)
    if kind == "forward_kl":
        return kl(q, p)
    mixture = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * kl(p, mixture) + (1 - beta) * kl(q, mixture)


def reference_entropy(row):
    return -sum(p * math.log(p) for p in softmax(row) if p > 0)


def test_registry_lists_the_three_kinds():
    assert DIVERGENCES.names() == sorted(KINDS)


@pytest.mark.parametrize(
    "kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9)]
)
def test_divergence_matches_python_reference(kind, beta):
    student, teacher = logits_pair(0)
    values = token_divergence(student, teacher, kind, beta=beta)
    assert values.shape == (ROWS,) and values.dtype == torch.float32
    for row in range(ROWS):
        expected = reference(student[row].tolist(), teacher[row].tolist(), kind, beta)
        assert values[row].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_student_gradients(kind):
    student, teacher = logits_pair(1)
    weights = torch.linspace(0.5, 2.0, ROWS)  # a non-uniform upstream gradient per row
    results = []
    for chunk_rows in (3, 1000):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        values = token_divergence(s, t, kind, beta=0.3, chunk_rows=chunk_rows)
        (values * weights).sum().backward()
        assert t.grad is None  # the teacher side is detached
        results.append((values.detach(), s.grad))
    (chunked, chunked_grad), (whole, whole_grad) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-6, atol=1e-7)


def saved_storages(compute):
    """Storage addresses of every tensor autograd saves for the backward while `compute` runs."""
    storages = []

    def pack(tensor):
        storages.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return storages


def test_autograd_keeps_only_views_of_the_inputs():
    # Checkpointed chunks: the backward recomputes each chunk's [chunk, V] temporaries instead of
    # keeping all of them, so the only saved tensors are slices of the caller's logits.
    student, teacher = logits_pair(8)
    student.requires_grad_(True)
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    for kind in KINDS:
        storages = saved_storages(lambda: token_divergence(student, teacher, kind, chunk_rows=3))
        assert storages and set(storages) <= inputs
    assert set(saved_storages(lambda: token_entropy(student, chunk_rows=3))) <= inputs


def test_kl_gradients_match_closed_forms():
    # d KL(P_S||P_T) / d z_S = p_S * (log p_S - log p_T - KL);  d KL(P_T||P_S) / d z_S = p_S - p_T.
    student, teacher = logits_pair(2)
    for kind in ("reverse_kl", "forward_kl"):
        s = student.clone().requires_grad_(True)
        token_divergence(s, teacher, kind, chunk_rows=4).sum().backward()
        for row in range(ROWS):
            p, q = softmax(student[row].tolist()), softmax(teacher[row].tolist())
            if kind == "reverse_kl":
                value = kl(p, q)
                expected = [pi * (math.log(pi / qi) - value) for pi, qi in zip(p, q)]
            else:
                expected = [pi - qi for pi, qi in zip(p, q)]
            assert s.grad[row].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_bounds_and_identical_distributions(seed):
    student, teacher = logits_pair(seed, rows=50, scale=4.0)
    for kind in ("reverse_kl", "forward_kl"):
        assert (token_divergence(student, teacher, kind) >= -1e-6).all()
    jsd = token_divergence(student, teacher, "jsd", beta=0.5)
    assert (jsd >= -1e-6).all() and (jsd <= math.log(2) + 1e-6).all()
    # Near-disjoint distributions approach the bound.
    far = torch.full((1, VOCAB), -30.0)
    far_teacher = far.clone()
    far[0, 0], far_teacher[0, 1] = 30.0, 30.0
    assert token_divergence(far, far_teacher, "jsd").item() == pytest.approx(math.log(2), abs=1e-5)
    for kind in KINDS:
        # A shift of all logits leaves the distribution unchanged.
        same = token_divergence(student, student + 3.0, kind)
        assert same.abs().max().item() < 1e-5


def test_jsd_beta_endpoints_are_zero():
    student, teacher = logits_pair(3)
    for beta in (0.0, 1.0):
        assert token_divergence(student, teacher, "jsd", beta=beta).abs().max().item() < 1e-6


def test_unknown_kind_and_bad_arguments():
    student, teacher = logits_pair(4)
    with pytest.raises(ValueError, match="reverse_kl"):
        token_divergence(student, teacher, "kl_reverse")
    with pytest.raises(ValueError):
        token_divergence(student, teacher[:, :5], "reverse_kl")
    with pytest.raises(ValueError):
        token_divergence(student, teacher, "jsd", beta=1.5)
    with pytest.raises(ValueError):
        token_divergence(student, teacher, "jsd", chunk_rows=0)


def test_low_precision_logits_are_computed_in_float32():
    student, teacher = logits_pair(5)
    values = token_divergence(student.bfloat16(), teacher.bfloat16(), "reverse_kl", chunk_rows=4)
    assert values.dtype == torch.float32
    expected = token_divergence(student.bfloat16().float(), teacher.bfloat16().float(), "reverse_kl")
    torch.testing.assert_close(values, expected)


def test_entropy_matches_reference_chunked_and_under_no_grad():
    logits, _ = logits_pair(6)
    with torch.no_grad():
        chunked = token_entropy(logits, chunk_rows=3)
    whole = token_entropy(logits, chunk_rows=1000)
    for row in range(ROWS):
        assert chunked[row].item() == pytest.approx(reference_entropy(logits[row].tolist()), rel=1e-5)
    torch.testing.assert_close(chunked, whole)
    assert (chunked <= math.log(VOCAB) + 1e-6).all()
    uniform = token_entropy(torch.zeros(2, VOCAB))
    assert uniform.tolist() == pytest.approx([math.log(VOCAB)] * 2, rel=1e-6)


def test_entropy_gradients_chunked_equal_unchunked():
    logits, _ = logits_pair(7)
    grads = []
    for chunk_rows in (3, 1000):
        x = logits.clone().requires_grad_(True)
        token_entropy(x, chunk_rows=chunk_rows).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_empty_input():
    empty = torch.zeros(0, VOCAB)
    assert token_divergence(empty, empty, "jsd").shape == (0,)
    assert token_entropy(empty).shape == (0,)
