"""Time the MONAI Label app over HTTP: start-up until GET /info/ answers, the first request (which embeds the image),
a session continuation (which must not), and a new session on the same slice (served from the embedding cache).

    .venv/bin/python benchmarks/bench_server.py                       # tiny random VLM, default tool
    .venv/bin/python benchmarks/bench_server.py --tool medsam2 --model /models/ibisagent-7b --device cuda

It starts `monailabel start_server` on 127.0.0.1 with a studies folder made in a temporary directory from the shared
demo data, and stops the server (its own process group) when done.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO.parent / "shared" / "data" / "biomedparse-demo" / "biomedparse_datasets" / "BiomedParseData-Demo" / "demo"
IMAGE = "04_CT_liver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, conf: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    import requests

    port = _free_port()
    log_config = tmp / "logging.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "handlers": {"console": {"class": "logging.StreamHandler"}},
                "root": {"level": "WARNING", "handlers": ["console"]},
            }
        )
    )
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(PYTHONDONTWRITEBYTECODE="1", MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"), HF_HUB_OFFLINE="1")
    app = tmp / "app"  # as scripts/serve.sh runs it: MONAI Label's model/, logs/, bin/ land here, not in the checkout
    app.mkdir()
    for name in ("main.py", "lib"):
        (app / name).symlink_to(REPO / "monailabel_app" / name)
    command = ["monailabel", "start_server", "--app", str(app), "--studies", str(tmp / "studies")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log_config", str(log_config)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed with the process
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except requests.ConnectionError:
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _infer(url: str, params: dict) -> tuple[float, dict]:
    import requests

    t0 = time.perf_counter()
    r = requests.post(
        f"{url}/infer/ibisagent", params={"image": IMAGE, "output": "all"}, data={"params": json.dumps(params)}
    )
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        sys.exit(f"request {params} failed: {r.status_code} {r.text[:500]}")
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    part = next(
        p for p in MultipartDecoder.from_response(r).parts if b'name="params"' in p.headers[b"Content-Disposition"]
    )
    return seconds, json.loads(part.content)


def main() -> None:
    default_tool = "classical" if importlib.util.find_spec("ibisagent.tools.classical") else "medsam2"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", default=default_tool, help=f"--conf tool (default here: {default_tool})")
    parser.add_argument("--checkpoint", help="--conf checkpoint of a model tool")
    parser.add_argument("--model", help="--conf model; default: a tiny random Qwen2.5-VL built for the run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", default="32", help="--conf max_new_tokens (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="continuations to time (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_server_") as name:
        tmp = Path(name)
        (tmp / "studies").mkdir()
        shutil.copyfile(DEMO / f"{IMAGE}.png", tmp / "studies" / f"{IMAGE}.png")
        model = args.model
        if model is None:
            from ibisagent.testing import build_tiny_qwen2_5_vl

            model = str(tmp / "tiny-vlm")
            build_tiny_qwen2_5_vl(model)
        conf = {"model": model, "tool": args.tool, "device": args.device, "max_new_tokens": args.max_new_tokens}
        if args.checkpoint:
            conf["checkpoint"] = args.checkpoint
        proc, url, startup = _start(tmp, conf)
        try:
            first_s, first = _infer(url, {"instruction": "segment the liver", "foreground": [[600, 450]]})
            sid = first["session_id"]
            tool_only, agent = [], []
            for i in range(args.repeats):
                s, r = _infer(url, {"session_id": sid, "foreground": [[610 + i, 460]], "run_agent": False})
                tool_only.append(s)
                assert r["encode_count"] == first["encode_count"], "a continuation re-encoded the image"
                s, r = _infer(url, {"session_id": sid, "background": [[100 + i, 100]], "max_steps": 1})
                agent.append(s)
            again_s, again = _infer(url, {"instruction": "segment the liver", "foreground": [[600, 450]]})
        finally:
            _stop(proc)

    print(f"server: tool {args.tool}, model {'tiny random Qwen2.5-VL' if args.model is None else model}, {args.device}")
    print(f"start-up until GET /info/ answers     {startup:7.2f} s")
    print(
        f"first request (new session, agent)    {first_s:7.2f} s   of which embedding "
        f"{first['trajectory']['meta']['server']['encode_seconds']:.2f} s, stop {first['stop_reason']}"
    )
    print(f"continuation, one click, tool only    {statistics.median(tool_only):7.2f} s   (median of {args.repeats})")
    print(f"continuation, one click + agent step  {statistics.median(agent):7.2f} s   (median of {args.repeats})")
    print(
        f"new session on the same slice         {again_s:7.2f} s   encode_count {again['encode_count']} "
        f"(first session: {first['encode_count']}); server embeddings in all: "
        f"{again['trajectory']['meta']['server']['tool_encode_count']}"
    )


if __name__ == "__main__":
    main()
