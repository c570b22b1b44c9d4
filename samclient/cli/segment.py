"""Segment an image through a running samserve and save the masks drawn over it.

    samserve-segment demo/example.jpg --point 160,175 --box 330,60,560,200
    samserve-segment photo.jpg --point 50,80 --point 90,20,0 --grpc
    samserve-segment stack.tif --page 3 --intensity-range 100,4095 --box 10,10,80,90
    samserve-segment photo.jpg --point 50,80 --host 10.0.0.5 --key-file inference_key.json

Each ``--point x,y[,label]`` (label 1 foreground by default, 0 background) and each
``--box x0,y0,x1,y1`` is its own prompt; ``--point ... --with-box`` joins them. The server
is found where ``--config`` (default: ./config.properties, if there is one) says, else at
TorchServe's default ports on 127.0.0.1; ``--host`` and ``--port`` override that. Its key
comes from ``--key-file``, else the first of $SAMSERVE_KEY_FILE, ``--workdir``'s
key_file.json, ./run/key_file.json and ./key_file.json, and is renewed through
TorchServe's token API once expired, when that file holds the API key.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samclient.body import segment_request
from samclient.keys import KeySource
from samclient.masks import decode_segmentation
from samclient.overlay import draw_overlay, picture
from samclient.rest_client import RestClient
from samclient.server import Addresses

if TYPE_CHECKING:  # imported when asked for: only gRPC calls need protobuf and grpc
    from samclient.grpc_client import GrpcClient

Predict = Callable[[dict[str, Any]], dict[str, Any]]


def parse_prompts(points: list[str], boxes: list[str], together: bool) -> list[dict]:
    """Protocol prompts from the command line's ``x,y[,label]`` and ``x0,y0,x1,y1`` strings.

    Arguments:
      points: each ``--point``, in the image's pixel frame.
      boxes: each ``--box``, in the image's pixel frame.
      together: one prompt of all the points and the first box, instead of one each.

    Returns:
      The prompts, points before boxes.
    """
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
    predict: Predict,
    image: bytes,
    prompts: list[dict],
    page: int = 0,
    intensity_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """All ``prompts`` on ``image``, as SAM advises: three masks (best first) for a single
    click, which is ambiguous, and one mask for boxes and several points.

    The image goes with the first request, with how to read it; a second, if needed,
    names it by ``image_id``.

    Arguments:
      predict: sends one request body and returns the response (a client's ``predict``).
      image: the encoded image.
      prompts: protocol prompts in the image's pixel frame.
      page: the frame of a multi-page image, from 0.
      intensity_range: the sample values shown black and white in an image of more than
        8 bits per sample (None: the server's default).

    Returns:
      The first response, with every prompt's result in the order given.
    """
    ambiguous = [len(p.get("points", [])) == 1 and "box" not in p for p in prompts]
    first_multimask = ambiguous[0] if prompts else True
    first = [i for i, a in enumerate(ambiguous) if a == first_multimask]
    rest = [i for i, a in enumerate(ambiguous) if a != first_multimask]
    response = predict(
        segment_request(
            image=image,
            prompts=[prompts[i] for i in first],
            multimask=first_multimask,
            page=page or None,
            intensity_range=intensity_range,
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


def parser(root: Path) -> argparse.ArgumentParser:
    """The command line, with defaults below ``root``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1")
    parser.add_argument("--with-box", action="store_true", help="points and box as one prompt")
    parser.add_argument("--model", default="sam")
    parser.add_argument("--grpc", action="store_true", help="call the gRPC API instead of REST")
    parser.add_argument("--host", help="server host (default: the config's, or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="inference port (default: the config's)")
    parser.add_argument("--config", type=Path, help="the server's config.properties "
                        f"(default: {root / 'config.properties'}, if it exists)")  # fmt: skip
    parser.add_argument("--key-file", type=Path, help="the server's key_file.json, or a copy")
    parser.add_argument("--workdir", type=Path, default=root / "run",
                        help="server directory holding key_file.json")  # fmt: skip
    parser.add_argument("--out", type=Path, default=root / "out" / "overlay.png")
    parser.add_argument("--page", type=int, default=0, help="page of a multi-page TIFF, from 0")
    parser.add_argument(
        "--intensity-range", metavar="LOW,HIGH",
        help="sample values shown black and white in an image of more than 8 bits per sample "
        "(default: the image's 1st and 99.8th percentiles)",
    )  # fmt: skip
    return parser


def open_client(
    args: argparse.Namespace, addresses: Addresses, keys: KeySource
) -> RestClient | GrpcClient:
    """A REST or gRPC client of the server, as ``args`` ask (``--grpc``, ``--host``,
    ``--port``); otherwise at ``addresses``."""
    if args.grpc:
        from samclient.grpc_client import GrpcClient

        host = args.host or addresses.grpc_inference_host
        port = args.port or addresses.grpc_inference_port
        return GrpcClient(host, port, keys=keys, token_url=addresses.management_url)
    url = addresses.inference_url
    if args.host or args.port:
        url = f"http://{args.host or '127.0.0.1'}:{args.port or 8080}"
    return RestClient(url, addresses.management_url, keys=keys)


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    """``samserve-segment``: segment, draw, and print a line per prompt.

    Arguments:
      argv: the arguments (default: the command line's).
      root: the folder whose config.properties, run/ and out/ the defaults name (default:
        the current directory; scripts/segment.py passes the project's checkout).

    Returns:
      The exit status.
    """
    root = root if root is not None else Path()
    args = parser(root).parse_args(argv)
    intensity = args.intensity_range and tuple(float(v) for v in args.intensity_range.split(","))
    addresses = Addresses.find(args.config, root / "config.properties")
    keys = KeySource(args.key_file) if args.key_file else KeySource(search_from=args.workdir)

    data = args.image.read_bytes()
    prompts = parse_prompts(args.point, args.box, args.with_box)
    client = open_client(args, addresses, keys)
    try:
        predict = functools.partial(client.predict, args.model)
        response = segment(predict, data, prompts, args.page, intensity or None)
    finally:
        client.close()

    # The picture under the masks is the one the server segmented: same page, same scale.
    image = picture(data, args.page, intensity or None)
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
