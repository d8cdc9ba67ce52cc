"""The toy world (deterministic, captions match images, held-out combinations), its detector, the
quality metrics, and the shipped toy-world teacher (loads through WanT2V, passes the detector)."""

from __future__ import annotations

import numpy as np
import pytest

from distill import toyworld
from distill.quality import image_metrics, make_quality_set


def test_generator_is_deterministic_and_splits_hold_out_pairs():
    a, b = toyworld.scenes("train", 300, seed=3), toyworld.scenes("train", 300, seed=3)
    assert a == b
    assert [toyworld.caption(s) for s in a] != [toyworld.caption(s) for s in toyworld.scenes("train", 300, seed=4)]
    np.testing.assert_array_equal(toyworld.render(a[7]), toyworld.render(b[7]))
    assert not any((s.shape, s.colour) in toyworld.HELD_OUT for s in a)
    held = toyworld.scenes("heldout", 300, seed=3)
    assert all((s.shape, s.colour) in toyworld.HELD_OUT for s in held)
    assert {(s.shape, s.colour) for s in held} == set(toyworld.HELD_OUT)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_images_and_the_detector_reads_them(split):
    """Ground truth: the detector recovers every attribute of the generator's images (so the caption,
    which parses back to the same attributes, describes the image)."""
    scenes = toyworld.scenes(split, 600, seed=11)
    hits = {}
    for scene in scenes:
        text = toyworld.caption(scene)
        assert toyworld.parse(text) == toyworld.attributes(scene), text
        for key, ok in toyworld.score(scene, toyworld.detect(toyworld.render(scene))).items():
            hits.setdefault(key, []).append(ok)
    accuracy = {k: float(np.mean(v)) for k, v in hits.items()}
    assert all(a == 1.0 for a in accuracy.values()), accuracy
    assert set(accuracy) == set(toyworld.ATTRIBUTES)


def test_detector_is_not_fooled_by_a_blank_or_wrong_image():
    scene = toyworld.scenes("train", 1, seed=0)[0]
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert not all(toyworld.score(scene, toyworld.detect(blank)).values())
    other = toyworld.Scene("square" if scene.shape != "square" else "circle", scene.colour, scene.size, scene.count,
                           scene.background, scene.position, scene.centres)
    assert not toyworld.score(scene, toyworld.detect(toyworld.render(other)))["shape"]


def test_metrics_have_their_fields_and_values():
    captions = [toyworld.caption(s) for s in toyworld.scenes("heldout", 3, seed=1)] + ["not a toy caption"]
    qset = make_quality_set(captions, per_caption=3, latent_hw=(8, 8))
    scenes = toyworld.scenes("heldout", 3, seed=1)
    images = np.stack([toyworld.render(scenes[c]) if c < 3 else np.zeros((64, 64, 3), np.uint8)
                       for c in qset.caption_of])
    m = image_metrics(images, qset, saturation=0.25, reference=images)
    for key in ("accuracy", "accuracy/all", "accuracy/shape", "diversity", "saturation", "psnr_to_teacher",
                "r2_to_teacher"):
        assert key in m, key
    assert m["accuracy/all"] == 1.0 and m["saturation"] == 0.25  # the non-toy caption is not scored
    assert m["r2_to_teacher"] == 1.0 and m["psnr_to_teacher"] > 90 and m["diversity"] == 0.0
    others = images[::-1]  # every sample compared with another caption's image
    worse = image_metrics(others, qset, 0.0, reference=images)
    assert worse["r2_to_teacher"] < 0.5 and worse["psnr_to_teacher"] < 20


def test_shipped_toy_teacher_loads_and_passes_the_detector(tmp_path):
    """The trained teacher unpacks into the release layout, loads through WanT2V, and its 40-step CFG
    samples of held-out captions (combinations it never saw) are read back by the detector."""
    from distill.quality import toy_teacher_report
    from distill.toy_teacher import toy_release
    from wan.configs import load_config
    from wan.text2video import WanT2V

    folder = toy_release(tmp_path)
    pipe = WanT2V(load_config(folder / "config_toy_t2v.json"), folder, device="cpu")
    captions = toyworld_prompts()
    metrics, images = toy_teacher_report(pipe, captions, per_caption=2)
    assert images.shape == (len(captions) * 2, 64, 64, 3)
    print("toy teacher on held-out captions:", {k: round(v, 3) for k, v in metrics.items()})
    assert metrics["accuracy"] >= 0.8, metrics


def toyworld_prompts() -> list[str]:
    from distill.config import ASSETS

    return [l.strip() for l in (ASSETS / "prompts_toy_heldout.txt").read_text().splitlines() if l.strip()]


def test_collapse_warning_compares_with_the_first_trained_evaluation(caplog):
    """Diversity or accuracy below half of the first evaluation after step 0 warns; step 0 is no baseline."""
    import logging

    from distill.evaluators import QualityEvaluator

    ev = QualityEvaluator.__new__(QualityEvaluator)  # only the bookkeeping is under test
    ev.first, ev.steps = None, (1, 4)
    key = "quality/student_{}step/{}".format
    fields = lambda div, acc: {key(k, "diversity"): div for k in ev.steps} | {key(k, "accuracy"): acc for k in ev.steps}
    with caplog.at_level(logging.WARNING, logger="distill.evaluators"):
        ev._warn_on_collapse(0, fields(0.9, 0.0))  # untrained: ignored
        ev._warn_on_collapse(100, fields(0.06, 0.8))  # the baseline
        ev._warn_on_collapse(200, fields(0.05, 0.7))  # a little lower: fine
        assert not caplog.records
        ev._warn_on_collapse(300, fields(0.02, 0.7))
    assert len(caplog.records) == 2  # diversity, for both step counts
    assert "diversity fell from 0.060 (first evaluation) to 0.020" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.evaluators"):
        ev._warn_on_collapse(400, fields(0.06, 0.3))
    assert [r.getMessage().split(": ")[1].split(" fell")[0] for r in caplog.records] == [
        "the 1-step student's accuracy", "the 4-step student's accuracy"]
