"""The web demo end to end: Debian's Chromium drives demo/index.html against a real
TorchServe with token auth on; the page is served by scripts/demo.py, which forwards its
API calls (with the page's token) to TorchServe."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests

from build_mar import build_archive
from conftest import PORTS, micro_server, png_bytes
from demo import KEY_HEADER, PageKeys, Upstream, demo_url, serve
from samclient.keys import read_keys
from samclient.masks import decode_segmentation
from samclient.rest_client import RestClient
from samclient.server import Ports, TorchServe
from samserve.models import spec_by_name
from training.evaluate import iou
from training.prompts import random_pixel
from training.synthetic import make_sample

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "sam_small_shapes.pth"
ARTIFACTS = REPO / "out" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "Debian's chromium is not installed: bash scripts/test.sh installs it (setup.sh --browser)"
)
MASK_RGB = (30, 144, 255)  # the page's single-object mask colour


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    """TorchServe (own ports) with the trained model as ``sam``, and the demo's server."""
    if CHROMIUM is None:
        pytest.fail(NO_CHROMIUM)
    root = tmp_path_factory.mktemp("demo")
    build_archive(spec_by_name("sam_small"), SHIPPED, root / "store", "sam")
    server = TorchServe(root / "run", root / "store", Ports.offset(PORTS.inference - 8080 + 700))
    server.start()
    static = serve(0, upstream(server))
    try:
        rest = RestClient(server.inference_url, server.management_url, keys=server.keys())
        rest.register_model("sam.mar", "sam", initial_workers=1)
        url = demo_url(static.server_port, "sam", server.keys().inference)
        yield url, root, rest
    finally:
        static.shutdown()
        server.stop()


def upstream(server: TorchServe) -> Upstream:
    """What scripts/demo.py forwards to for ``server``: its inference API and key file."""
    return Upstream(server.inference_url, PageKeys(server.key_source(), server.management_url))


def wait_for(page, condition: str, console: list[str], timeout: float = 60_000) -> None:
    """Wait for a JS condition; on timeout, fail with what the page said."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=timeout)
    except PlaywrightTimeout:
        status = page.text_content("#status")
        pytest.fail(f"timed out waiting for {condition!r}; status {status!r}; console {console}")


def overlay_mask(page) -> np.ndarray:
    """HxW bool: overlay pixels drawn in the mask colour (the click's marker, drawn on top,
    is not; the IoU bound below allows for its few pixels)."""
    data = page.evaluate(
        """() => {
            const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return {w: c.width, h: c.height, rgba: Array.from(d)};
        }"""
    )
    rgba = np.array(data["rgba"], dtype=np.uint8).reshape(data["h"], data["w"], 4)
    return (rgba[..., 3] > 0) & np.all(np.abs(rgba[..., :3].astype(int) - MASK_RGB) < 8, axis=-1)


@contextmanager
def opened_demo(url: str) -> Iterator[tuple[Any, list[str], list[str]]]:
    """The demo page at ``url`` in headless Chromium, once it has sent its example image:
    the page, and the page errors and console lines it logs meanwhile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            errors: list[str] = []
            console: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: console.append(message.text))
            page.goto(url)
            wait_for(page, "document.body.dataset.imageId !== undefined", console)
            yield page, errors, console
        finally:
            browser.close()


def test_click_on_an_object_shows_its_mask(demo_setup):
    url, root, rest = demo_setup
    sample = make_sample(np.random.default_rng([30_000, 14]), 360, 480, 4)  # 3 objects
    image_path = root / "shapes.png"
    image_path.write_bytes(png_bytes(sample.image))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    overlaps = []

    with opened_demo(url) as (page, errors, console):
        example_id = page.evaluate("document.body.dataset.imageId")
        page.set_input_files("#file", str(image_path))
        wait_for(page, f"document.body.dataset.imageId !== '{example_id}'", console)
        box = page.locator("#overlay").bounding_box()
        scale = box["width"] / 480
        for index, truth in enumerate(sample.masks):
            page.click("#reset")
            x, y = random_pixel(truth, np.random.default_rng(index))
            page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
            wait_for(page, f"document.body.dataset.masks === '{index + 1}'", console)
            shown = overlay_mask(page)
            page.screenshot(path=str(ARTIFACTS / f"demo-click-{index}.png"))
            # What the server answers to the request the page sent is what it must show.
            sent = json.loads(page.evaluate("document.body.dataset.lastRequest"))
            answer = rest.predict("sam", sent)["results"][0]["masks"][0]
            expected = decode_segmentation(answer)
            assert iou(shown, expected) > 0.95, (index, iou(shown, expected))
            overlaps.append(iou(shown, truth))

        page.click("#everything")
        wait_for(page, "document.body.dataset.count !== undefined", console, 120_000)
        count = int(page.evaluate("document.body.dataset.count"))
        page.screenshot(path=str(ARTIFACTS / "demo-everything.png"))
        status = page.text_content("#status")

    assert not errors, errors
    print(f"demo: IoU of the mask shown with the clicked object: {overlaps}; "
          f"segment everything: {count} masks ({status})")  # fmt: skip
    assert max(overlaps) > 0.6, overlaps  # the mask is drawn where the object is
    assert count >= 1, status


# Keys that expire within seconds: token_expiration_min is read as a Double
# (ConfigManager.getTimeToExpiration in pytorch/serve's frontend).
EXPIRY_MIN = 0.2


@pytest.fixture(scope="module")
def busy_demo(tmp_path_factory, checkpoints):
    """TorchServe (own ports) with two workers of sam_micro and keys that expire in
    seconds, and the demo's server."""
    if CHROMIUM is None:
        pytest.fail(NO_CHROMIUM)
    root = tmp_path_factory.mktemp("busy_demo")
    overrides = {"token_expiration_min": str(EXPIRY_MIN)}
    with micro_server(root, checkpoints["sam_micro"], 760, 2, overrides) as server:
        forward = upstream(server)
        static = serve(0, forward)
        try:
            yield demo_url(static.server_port, "sam", forward.keys.hand_out()), server, static
        finally:
            static.shutdown()


def test_the_page_clicks_on_across_workers_and_past_its_keys_expiry(busy_demo):
    """Two workers, each with its own cache: clicks by image_id that reach the one that
    never saw the image are sent again with it, and refinements whose logits the other
    worker holds go without them. Once the page's key expired, demo.py answers with the
    renewed key, and the page keeps it in its URL."""
    url, server, static = busy_demo
    handed = parse_qs(urlsplit(url).fragment)["key"][0]
    with opened_demo(url) as (page, errors, console):
        box = page.locator("#overlay").bounding_box()
        scale = box["width"] / 640  # example.jpg is 640x480

        def click(index: int, x: float, y: float) -> None:
            page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
            wait_for(page, f"document.body.dataset.masks === '{index}'", console)
            assert page.evaluate("document.body.dataset.status") == "ok", page.text_content(
                "#status"
            )

        for index in range(1, 5):  # one object, refined click by click
            click(index, 150 + 10 * index, 170)
        resends = int(page.evaluate("document.body.dataset.resends || 0"))
        dropped = int(page.evaluate("document.body.dataset.maskInputsDropped || 0"))

        expired = read_keys(server.key_file)
        wait_until = max(expired.inference_expires, datetime.now(timezone.utc))
        time.sleep((wait_until - datetime.now(timezone.utc)).total_seconds() + 0.5)
        # TorchServe itself refuses the key the page was given.
        refused = requests.post(
            f"{server.inference_url}/predictions/sam",
            headers={"Authorization": f"Bearer {handed}"},
            json={"image_id": page.evaluate("document.body.dataset.imageId")},
            timeout=30,
        )
        assert refused.status_code == 400 and "InvalidKeyException" in refused.text

        page.click("#reset")
        click(5, 400, 120)
        fragment_key = parse_qs(urlsplit(page.url).fragment)["key"][0]

    assert not errors, errors
    assert resends >= 1  # the second worker had not seen the image
    assert dropped >= 1  # nor the logits of the click before, which the first one answered
    assert fragment_key != handed
    assert fragment_key == read_keys(server.key_file).inference


def test_the_demo_server_hands_no_key_to_a_request_without_one_it_gave(busy_demo):
    _, server, static = busy_demo
    for headers in ({"Authorization": "Bearer not-a-key"}, {}):
        reply = requests.post(
            f"http://127.0.0.1:{static.server_port}/predictions/sam",
            headers={**headers, "Content-Type": "application/json"},
            data=b"{}",
            timeout=30,
        )
        assert reply.status_code == 400 and "InvalidKeyException" in reply.text
        assert KEY_HEADER not in reply.headers
