#!/usr/bin/env python
"""Segment an image through a running samserve and save the masks drawn over it.

    python scripts/segment.py demo/example.jpg --point 160,175 --box 330,60,560,200
    python scripts/segment.py photo.jpg --point 50,80 --point 90,20,0 --grpc
    python scripts/segment.py stack.tif --page 3 --intensity-range 100,4095 --box 10,10,80,90

Each ``--point x,y[,label]`` (label 1 foreground by default, 0 background) and each
``--box x0,y0,x1,y1`` is its own prompt; ``--point ... --with-box`` joins them. The server
is found where config.properties says; its key comes from its key_file.json (renewed
through TorchServe's token API once expired, when that file holds the API key).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "handler")]

from samclient.body import segment_request  # noqa: E402
from samclient.keys import KeySource  # noqa: E402
from samclient.overlay import draw_overlay  # noqa: E402
from samclient.server import DEFAULT_CONFIG, Addresses  # noqa: E402
from samserve.images import DEFAULT_DECODE, DecodeOptions, decode_image  # noqa: E402
from samserve.masks import decode_segmentation  # noqa: E402


def parse_prompts(points: list[str], boxes: list[str], together: bool) -> list[dict]:
    """Protocol prompts from ``x,y[,label]`` and ``x0,y0,x1,y1`` strings."""
    parsed_points = []
    for text in points:
        values = [float(v) for v in text.split(",")]
        label = int(values[2]) if len(values) > 2 else 1
        parsed_points.append(([values[0], values[1]], label))
    parsed_boxes = [[float(v) for v in text.split(",")] for text in boxes]
    if together:
        prompt: dict = {}
        if parsed_points:
            prompt["points"] = [p for p, _ in parsed_points]
            prompt["labels"] = [lab for _, lab in parsed_points]
        if parsed_boxes:
            prompt["box"] = parsed_boxes[0]
        return [prompt]
    prompts = [{"points": [p], "labels": [lab]} for p, lab in parsed_points]
    return prompts + [{"box": box} for box in parsed_boxes]


def segment(
    predict: Callable[[dict[str, Any]], dict[str, Any]],
    image: bytes,
    prompts: list[dict],
    reading: DecodeOptions = DEFAULT_DECODE,
) -> dict[str, Any]:
    """All ``prompts`` on ``image``, as SAM advises: three masks (best first) for a
    single click, which is ambiguous, and one mask for boxes and several points. The image
    goes with the first request, read as ``reading`` says (page, intensity range); a
    second, if needed, names it by ``image_id``. Returns the first response with every
    prompt's result in the order given."""
    ambiguous = [len(p.get("points", [])) == 1 and "box" not in p for p in prompts]
    first_multimask = ambiguous[0] if prompts else True
    first = [i for i, a in enumerate(ambiguous) if a == first_multimask]
    rest = [i for i, a in enumerate(ambiguous) if a != first_multimask]
    response = predict(
        segment_request(
            image=image,
            prompts=[prompts[i] for i in first],
            multimask=first_multimask,
            page=reading.page or None,
            intensity_range=reading.intensity_range,
        )
    )
    results = dict(zip(first, response["results"]))
    if rest:
        body = segment_request(
            image_id=response["image_id"],
            prompts=[prompts[i] for i in rest],
            multimask=not first_multimask,
        )
        results.update(zip(rest, predict(body)["results"]))
    response["results"] = [results[i] for i in range(len(prompts))]
    return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1")
    parser.add_argument("--with-box", action="store_true", help="points and box as one prompt")
    parser.add_argument("--model", default="sam")
    parser.add_argument("--grpc", action="store_true", help="call the gRPC API instead of REST")
    parser.add_argument("--host", help="server host (default: config.properties')")
    parser.add_argument("--port", type=int, help="inference port (default: config.properties')")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the server's")
    parser.add_argument("--workdir", type=Path, help="server directory holding key_file.json")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "overlay.png")
    parser.add_argument("--page", type=int, default=0, help="page of a multi-page TIFF, from 0")
    parser.add_argument(
        "--intensity-range", metavar="LOW,HIGH",
        help="sample values shown black and white in an image of more than 8 bits per sample "
        "(default: the image's 1st and 99.8th percentiles)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    intensity = args.intensity_range and tuple(float(v) for v in args.intensity_range.split(","))
    reading = DecodeOptions(args.page, intensity or None)

    data = args.image.read_bytes()
    prompts = parse_prompts(args.point, args.box, args.with_box)
    keys = KeySource(search_from=args.workdir)
    addresses = Addresses.from_config(args.config)
    if args.grpc:
        from samclient.grpc_client import GrpcClient

        host = args.host or addresses.grpc_inference_host
        port = args.port or addresses.grpc_inference_port
        management = addresses.management_url
        with GrpcClient(host, port, keys=keys, token_url=management) as client:
            response = segment(
                lambda body: client.predict(args.model, body), data, prompts, reading
            )
    else:
        from samclient.rest_client import RestClient

        url = addresses.inference_url
        if args.host or args.port:
            url = f"http://{args.host or '127.0.0.1'}:{args.port or 8080}"
        client = RestClient(url, addresses.management_url, keys=keys)
        response = segment(lambda body: client.predict(args.model, body), data, prompts, reading)

    # The picture under the masks is the one the server segmented: same page, same scale.
    image = decode_image(data, len(data), response["width"] * response["height"], reading)
    best = [decode_segmentation(result["masks"][0]) for result in response["results"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, best, prompts).save(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(response))

    print(f"image_id {response['image_id']}  ({response['width']}x{response['height']}, "
          f"cached={response['cached']}, timing_ms={response['timing_ms']})")  # fmt: skip
    for prompt, result in zip(prompts, response["results"]):
        top = result["masks"][0]
        print(f"  {json.dumps(prompt)} -> score {top['score']:.3f}, area {top['area']} px, "
              f"bbox {top['bbox']}")  # fmt: skip
    print(f"overlay written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
