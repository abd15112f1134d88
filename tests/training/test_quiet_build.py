"""open_clip's "No pretrained weights loaded ... initialized randomly" is not printed for the
models we build (their weights come after, from student_init / teacher_pretrained / a
checkpoint), and no other warning is lost."""
import logging

from training.specs import build_student, model_spec

STUDENT = "configs/models/Tiny-ViT-Student.json"


def test_building_a_model_logs_no_random_init_notice(caplog):
    with caplog.at_level(logging.WARNING):
        spec = model_spec(STUDENT)
        build_student(spec)
        spec.preprocess_cfg
        logging.warning("an unrelated warning")  # the filter is gone after the build
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("No pretrained weights loaded")]
    assert "an unrelated warning" in messages
