"""The registered model served by a real ``mlflow models serve`` process: an image posted over HTTP on
127.0.0.1 comes back as the class map ``ccnet predict`` paints; bad requests get a 4xx and the server goes on
serving. The model is the segmenter pyfunc (:mod:`pipeline.tracking.segmenter`), which runs onnxruntime."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.eval.plots import colorize

pytestmark = [pytest.mark.integration, pytest.mark.slow]
QUICKSTART = str(Path(__file__).parents[2] / "configs" / "quickstart_ccnet-tiny_generated-192x192_cpu.yaml")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _files(*encoded: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[value] for value in encoded]}}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A quickstart model trained for 4 iterations and registered, served on 127.0.0.1 (stopped by PID)."""
    root = tmp_path_factory.mktemp("serve")
    data = str(root / "datasets")
    assert (
        main(
            [
                "data",
                "prepare",
                "--dataset",
                "generated",
                "--out",
                data,
                "--count",
                "train=8,val=3",
                "--image-size",
                "48",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    settings = [
        f"data.uri={data}/generated/v1",
        "data.crop_size=48",
        "data.batch_size=4",
        "data.loader_workers=0",
        "train.iterations=4",
        "train.eval_every=2",
        "model.gamma_init=0.5",
        f"run.storage={root / 'runs'}",
        "run.ray=false",
        f"tracking.uri={tracking}",
    ]
    assert main(["train", "-c", QUICKSTART, *[arg for s in settings for arg in ("--set", s)]]) == 0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # it starts `uvicorn` by name: the one installed beside this Python (an activated environment's)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(root / "serve.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/ccnet-generated@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a condition, not a fixed sleep: /ping answers 200
        while True:
            assert server.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"url": url, "root": root, "tracking": tracking, "data": f"{data}/generated/v1"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_a_posted_image_comes_back_as_the_mask_ccnet_predict_paints(
    served: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data.readers import open_manifest

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)  # sides that are not multiples of 8
    Image.fromarray(image).save(tmp_path / "frame.png")
    status, answer = _post(f"{served['url']}/invocations", _files(_png(image)))
    assert status == 200, answer
    (class_map,) = answer["predictions"]
    ids = np.asarray(class_map)
    assert ids.shape == (45, 61)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["tracking"])
    assert (
        main(
            [
                "predict",
                str(tmp_path / "frame.png"),
                "--checkpoint",
                "models:/ccnet-generated@champion",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    painted = np.asarray(Image.open(tmp_path / "out" / "frame_mask.png").convert("RGB"))
    served_painted = colorize(ids, open_manifest(served["data"]).palette, 255)
    assert (painted == served_painted).all(axis=-1).mean() >= 0.999
    # The same image as a pixel array, and two images at once.
    status, answer = _post(f"{served['url']}/invocations", {"inputs": image.tolist()})
    assert status == 200 and np.array_equal(np.asarray(answer["predictions"][0]), ids), answer
    status, answer = _post(f"{served['url']}/invocations", _files(_png(image), _png(image[:40, :50])))
    assert status == 200 and [np.asarray(m).shape for m in answer["predictions"]] == [(45, 61), (40, 50)]


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (_files(base64.b64encode(b"not an image").decode()), "not an image file"),
        (_files("%%% not base64 %%%"), "not base64"),
        (_files(_png(np.zeros((4100, 4100), dtype=np.uint8))), "pixels"),
        ({"inputs": [[1, 2], [3, 4]]}, "expected RGB pixel arrays"),
        ({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, "expected a column 'image'"),
        ({"inputs": np.full((4, 4, 3), 300).tolist()}, "0..255"),
    ],
    ids=["not-an-image", "not-base64", "huge", "wrong-shape", "wrong-column", "out-of-range"],
)
def test_a_bad_request_gets_a_4xx_and_the_server_goes_on(served: dict, payload: object, says: str) -> None:
    status, answer = _post(f"{served['url']}/invocations", payload)
    assert 400 <= status < 500 and says in answer.get("message", ""), (status, answer)
    image = np.full((32, 40, 3), 128, dtype=np.uint8)
    status, answer = _post(f"{served['url']}/invocations", _files(_png(image)))
    assert status == 200 and np.asarray(answer["predictions"][0]).shape == (32, 40)
