"""The shipped model, served for real: held-out mIoU through TorchServe and the .mar.

Any bug in a transform, resize, padding or mask encoding step between the client and
the model lowers these numbers, so they guard the whole pipeline, not just the weights.
Thresholds sit a little below the measured values in docs/model_card.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from build_mar import build_archive
from samserve.models import spec_by_name
from training.evaluate import count_objects, evaluate, heldout

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "sam_small_shapes.pth"
IMAGES = 40
# measured on these 40 images in process: 0.883, 0.885, 0.797 (all 100: 0.883, 0.884, 0.799)
MINIMUM = {"box": 0.86, "point_box": 0.86, "point": 0.77}
COUNT_IMAGES = 20
# measured on these 20 in process: exact on 50 % (all 100: 56 %)
MINIMUM_EXACT_COUNT = 0.4


def test_shipped_model_segments_heldout_images_through_torchserve(server, rest):
    build_archive(spec_by_name("sam_small"), SHIPPED, server.model_store, "sam_shapes")
    rest.register_model("sam_shapes.mar", "sam_shapes", initial_workers=1)
    predict = lambda body: rest.predict("sam_shapes", body)  # noqa: E731
    try:
        samples = heldout(IMAGES)
        metrics = evaluate(predict, samples)
        # segment everything with COUNT_PARAMS, mask NMS included, over REST
        counts = count_objects(predict, samples[:COUNT_IMAGES])
    finally:
        rest.unregister_model("sam_shapes")
    print("held-out metrics through TorchServe:", metrics)
    for key, minimum in MINIMUM.items():
        assert metrics[key] >= minimum, (key, metrics)
    assert metrics["refine_round2"] > metrics["refine_round1"], metrics
    print("object counts through TorchServe:", counts)
    assert counts["exact_count_rate"] >= MINIMUM_EXACT_COUNT, counts
