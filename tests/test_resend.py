"""samclient.resend: the images a client keeps, and the requests it sends again.

A real TorchServe with two workers answering ``image_not_cached`` is in test_workers.py;
here ``send`` is a plain function that answers as the handler does.
"""

from __future__ import annotations

import base64

import pytest

from samclient.errors import SamServeError
from samclient.resend import ResendOptions, SentImages, predict_resending

NOT_CACHED = SamServeError("image_not_cached", "image_id 'a' is not cached", status=404)
LOGITS_GONE = SamServeError("logits_not_cached", "mask_input 'l' is not cached", status=404)


def test_images_are_kept_within_their_byte_bound_least_recent_first_out():
    sent = SentImages(ResendOptions(memory_bytes=100))
    for name in "abc":
        sent.remember(name, name * 40)
    assert sent.image("a") is None and sent.image("b") == "b" * 40
    sent.remember("d", "d" * 40)  # "c" is now the least recently used
    assert sent.image("c") is None and sent.image("b") is not None
    assert sent.nbytes <= 100 and len(sent) == 2
    sent.remember("huge", "x" * 101)
    assert sent.image("huge") is None and len(sent) == 2


def test_raw_bytes_are_kept_as_the_base64_a_json_request_carries():
    sent = SentImages(ResendOptions())
    sent.remember("a", b"\x89PNG")
    assert sent.image("a") == base64.b64encode(b"\x89PNG").decode()


def test_a_click_by_id_goes_again_with_the_image_and_the_next_ones_carry_it():
    sent = SentImages(ResendOptions(attach_after_resend=2))
    sent.remember("a", "IMG")
    answers = iter([NOT_CACHED, {"image_id": "a", "results": []}])

    def send(body):
        answer = next(answers)
        if isinstance(answer, Exception):
            assert "image" not in body
            raise answer
        assert body["image"] == "IMG"
        return answer

    assert predict_resending(send, {"image_id": "a", "prompts": []}, sent) == {
        "image_id": "a",
        "results": [],
    }
    assert sent.resends == 1
    carried = [sent.prepare({"image_id": "a"}).get("image") for _ in range(3)]
    assert carried == ["IMG", "IMG", None]


def test_an_image_never_sent_cannot_be_resent():
    sent = SentImages(ResendOptions())

    def send(body):
        raise NOT_CACHED

    with pytest.raises(SamServeError) as caught:
        predict_resending(send, {"image_id": "a"}, sent)
    assert caught.value is NOT_CACHED and sent.resends == 0


def test_a_second_not_cached_is_raised():
    sent = SentImages(ResendOptions())
    sent.remember("a", "IMG")
    calls = []

    def send(body):
        calls.append(body)
        raise NOT_CACHED

    with pytest.raises(SamServeError):
        predict_resending(send, {"image_id": "a"}, sent)
    assert len(calls) == 2


@pytest.mark.parametrize("drop", [False, True])
def test_a_missing_mask_input_is_dropped_only_when_asked(drop):
    sent = SentImages(ResendOptions(drop_missing_mask_input=drop))
    body = {"image_id": "a", "prompts": [{"points": [[1, 2]], "labels": [1], "mask_input": "l"}]}
    sent_bodies = []

    def send(request):
        sent_bodies.append(request)
        if "mask_input" in request["prompts"][0]:
            raise LOGITS_GONE
        return {"image_id": "a", "results": [{}]}

    if not drop:
        with pytest.raises(SamServeError, match="mask_input"):
            predict_resending(send, body, sent)
        return
    assert predict_resending(send, body, sent)["results"] == [{}]
    assert sent_bodies[-1]["prompts"] == [{"points": [[1, 2]], "labels": [1]}]
    assert "mask_input" in body["prompts"][0]  # the caller's request is left as it was


def test_a_resent_image_is_read_as_it_was_sent_page_and_range():
    sent = SentImages(ResendOptions(attach_after_resend=1))
    reading = {"page": 2, "intensity_range": [0, 4095]}
    answers = iter([{"image_id": "p2"}, NOT_CACHED, {"image_id": "p2"}, {"image_id": "p2"}])
    bodies = []

    def send(body):
        bodies.append(dict(body))
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    predict_resending(send, {"image": "TIFF", **reading}, sent)
    predict_resending(send, {"image_id": "p2", "prompts": []}, sent)
    predict_resending(send, {"image_id": "p2", "prompts": []}, sent)
    assert bodies[1] == {"image_id": "p2", "prompts": []}
    assert bodies[2] == {"image_id": "p2", "prompts": [], "image": "TIFF", **reading}
    assert bodies[3] == bodies[2]  # carried along once after the resend
