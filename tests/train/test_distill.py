"""Knowledge distillation in the Trainer: the loss, a frozen teacher, and exact resume."""

import pytest
import torch
import torch.nn.functional as F

from icnn_compress import ConfigError, Distillation, Trainer, frozen_copy
from icnn_compress.train import distillation_loss

from .test_trainer import StopAfterFirstEpoch, loader, make_data, tiny_net


def test_distillation_loss_is_zero_for_equal_logits_and_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert float(distillation_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    p_t = F.softmax(t / 2, 1)
    expected = 4 * (p_t * (p_t.log() - F.log_softmax(s / 2, 1))).sum(1).mean()
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ConfigError, match="do not match"):
        distillation_loss(s, t[:, :3], 2.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"weight": 1.5}, "weight"), ({"temperature": 0}, "temperature"), ({"weight": float("nan")}, "weight")],
)
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        Distillation(tiny_net(), **kw)


def test_pure_distillation_from_an_identical_teacher_does_not_move_the_student():
    torch.manual_seed(0)
    student = tiny_net()
    teacher = frozen_copy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    Trainer(
        student,
        loader(make_data()),
        epochs=1,
        lr=0.1,
        weight_decay=0.0,
        distill=Distillation(teacher, weight=1.0, temperature=3.0),
        progress=False,
    ).fit()
    for k, v in before.items():  # KL(teacher || student) = 0 and its gradient is 0 at every step
        assert torch.allclose(v, student.state_dict()[k], atol=1e-6), k
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_distillation_changes_training_and_resume_stays_exact(tmp_path):
    def run(out, epochs=3, weight=0.5, **kw):
        torch.manual_seed(0)
        model = tiny_net()
        torch.manual_seed(1)
        teacher = frozen_copy(tiny_net())
        t = Trainer(
            model,
            loader(make_data()),
            epochs=epochs,
            lr=0.05,
            out_dir=out,
            progress=False,
            distill=Distillation(teacher, weight=weight),
            **kw,
        )
        return t.fit()

    full = run(tmp_path / "full")
    plain = run(tmp_path / "plain", weight=0.0)
    assert any(not torch.equal(v, plain.model.state_dict()[k]) for k, v in full.model.state_dict().items())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part", callbacks=[StopAfterFirstEpoch()])
    resumed = run(tmp_path / "part", resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
