"""Tests of src/fast_clip/distill.py (reference-model feature distillation and init-from-reference), CPU."""
import pytest
import torch
import torch.nn as nn

from fast_clip.distill import combine, feature_distill_loss, init_from_ref
from fast_clip.model import create_model

DT = torch.float64


# ------------------------------------------------------------------------------------------- feature loss
def test_value_on_hand_made_vectors():
    s_img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)
    t_img = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=DT)   # squared distances 2, 0
    s_txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=DT)
    t_txt = torch.tensor([[0.6, -0.8], [-1.0, 0.0]], dtype=DT)  # squared distances 2.56, 4
    loss, metrics = feature_distill_loss(s_img, s_txt, t_img, t_txt)
    assert loss.item() == pytest.approx((2 + 0) / 2 + (2.56 + 4) / 2, abs=1e-12)
    assert metrics == pytest.approx({"distill_img": 1.0, "distill_txt": 3.28}, abs=1e-12)


def test_gradient_wrt_student_is_two_diff_over_n():
    g = torch.Generator().manual_seed(0)
    n, d = 5, 3
    s_img, s_txt, t_img, t_txt = (torch.randn(n, d, generator=g, dtype=DT) for _ in range(4))
    s_img.requires_grad_(True)
    s_txt.requires_grad_(True)
    loss, _ = feature_distill_loss(s_img, s_txt, t_img, t_txt)
    loss.backward()
    torch.testing.assert_close(s_img.grad, 2 * (s_img.detach() - t_img) / n)
    torch.testing.assert_close(s_txt.grad, 2 * (s_txt.detach() - t_txt) / n)


def test_teacher_must_not_require_grad():
    s, t = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="teacher image features require grad"):
        feature_distill_loss(s, s, t, t.detach())
    with pytest.raises(ValueError, match="teacher text features require grad"):
        feature_distill_loss(s, s, t.detach(), t)


def test_dim_mismatch_names_both_dims():
    s, t = torch.randn(2, 128), torch.randn(2, 512)
    with pytest.raises(ValueError, match=r"student dim 128 vs teacher dim 512.*same embedding size"):
        feature_distill_loss(s, s, t, torch.randn(2, 128))
    with pytest.raises(ValueError, match="batch sizes differ"):
        feature_distill_loss(s, s, torch.randn(3, 128), torch.randn(2, 128))


def test_loss_is_float32_under_autocast():
    s, t = torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = feature_distill_loss(s, s, t, t)
    assert loss.dtype == torch.float32


# -------------------------------------------------------------------------------------------------- combine
def test_combine_weights():
    main, dist = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(main, dist, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 10)
    assert combine(main, dist, 0.0) is main
    assert combine(main, dist, 1.0) is dist
    # w = 0 must not let a non-finite distill value in (0 * inf = nan).
    assert combine(main, torch.tensor(float("inf")), 0.0).item() == 2.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            combine(main, dist, bad)


# -------------------------------------------------------------------------------------------- init_from_ref
def _tensors(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def test_init_from_ref_open_clip_models():
    torch.manual_seed(0)
    student = create_model("PersonTiny")
    torch.manual_seed(1)
    teacher = create_model("PersonTiny")
    params_before = list(student.parameters())
    ptrs_before = [p.data_ptr() for p in params_before]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    w = student.visual.conv1.weight
    assert not torch.equal(w, teacher.visual.conv1.weight)  # the seeds give different models

    report = init_from_ref(student, teacher)

    names = set(_tensors(student))
    assert set(report["copied"]) == names and len(report["copied"]) == len(names)
    assert report["shape_mismatch"] == [] and report["missing_in_teacher"] == []
    t_all = _tensors(teacher)
    for name, tensor in _tensors(student).items():
        assert torch.equal(tensor, t_all[name]), name
    # Copied in place: the same tensor objects and storage, so the optimizer built before still drives them.
    assert all(a is b for a, b in zip(student.parameters(), params_before))
    assert [p.data_ptr() for p in student.parameters()] == ptrs_before
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], student.parameters()))
    student.visual.conv1.weight.grad = torch.ones_like(w)
    opt.step()
    torch.testing.assert_close(student.visual.conv1.weight, teacher.visual.conv1.weight - 0.1)
    assert student.visual.conv1.weight.requires_grad  # still a trainable parameter


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)        # teacher: Linear(3, 5) -> shape mismatch
        self.extra = nn.Parameter(torch.zeros(2))   # not in the teacher
        self.register_buffer("stat", torch.zeros(3))
        self.register_buffer("bufmis", torch.zeros(4))  # teacher: shape (2,)


class _Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.head = nn.Linear(3, 5)
        self.only_teacher = nn.Parameter(torch.ones(1))
        self.register_buffer("stat", torch.arange(3.0))
        self.register_buffer("bufmis", torch.ones(2))


def test_init_from_ref_reports_mismatches_and_leaves_them_untouched():
    torch.manual_seed(0)
    s, t = _Student(), _Teacher()
    before = {k: v.detach().clone() for k, v in _tensors(s).items()}
    opt = torch.optim.SGD(s.parameters(), lr=1.0)

    report = init_from_ref(s, t)

    assert report["copied"] == ["a.weight", "a.bias", "stat"]
    assert report["shape_mismatch"] == [("head.weight", (2, 3), (5, 3)), ("head.bias", (2,), (5,)),
                                        ("bufmis", (4,), (2,))]
    assert report["missing_in_teacher"] == ["extra"]
    for name in report["copied"]:
        assert torch.equal(_tensors(s)[name], _tensors(t)[name])
    for name in ["head.weight", "head.bias", "bufmis", "extra"]:
        assert torch.equal(_tensors(s)[name], before[name])
    # The optimizer still references the student parameters: a step moves the copied weights from the teacher's.
    assert any(p is s.a.weight for p in opt.param_groups[0]["params"])
    s.a.weight.grad = torch.ones_like(s.a.weight)
    opt.step()
    torch.testing.assert_close(s.a.weight, t.a.weight.detach() - 1.0)
    assert t.a.weight.grad is None  # the teacher is never touched by the student's optimizer
