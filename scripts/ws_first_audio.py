#!/usr/bin/env python3
"""First-audio latency of the native WebSocket route, sentence-buffered vs bistream.

Serves ``--model_dir`` in this process on a free 127.0.0.1 port and, for each setting, opens
``--trials`` sessions that stream ``--text`` word by word (``--gap_ms`` between words, as an LLM writes),
then close. Reported per setting (medians over the trials): first audio after the first fragment was
sent, first audio after the first sentence was complete, the session's end after the last fragment,
and the seconds of audio. Tiny golden models need ``COSYSERVE_ASSETS_DIR``:

    COSYSERVE_ASSETS_DIR=../shared/assets python3 scripts/ws_first_audio.py \\
        --model_dir ../shared/golden/models/v2-tiny --trials 5 --gap_ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from typing import Any

TEXT = (
    "Streaming speech starts while the language model is still writing its answer. "
    "The second sentence of the answer is a little longer than the first one was. "
    "And a short third one!"
)


async def session(url: str, voice: str, text: str, gap: float, bistream: bool, seed: int) -> dict[str, float]:
    import websockets

    words = [w + " " for w in text.split(" ")]
    first_end = next(i for i, w in enumerate(words) if w.rstrip().endswith((".", "!", "?")))
    times: dict[str, float] = {}
    samples = 0
    async with websockets.connect(url, max_size=None) as ws:
        config = {"type": "session.config", "voice": voice, "seed": seed, "bistream": bistream}
        await ws.send(json.dumps(config))
        assert json.loads(await ws.recv())["type"] == "session.ready"

        async def reader() -> None:
            nonlocal samples
            async for message in ws:
                if isinstance(message, bytes):
                    times.setdefault("first_audio", time.perf_counter())
                    samples += len(message) // 2
                elif json.loads(message)["type"] == "error":
                    raise RuntimeError(message)

        task = asyncio.create_task(reader())
        for i, word in enumerate(words):
            await ws.send(json.dumps({"type": "text", "text": word}))
            now = time.perf_counter()
            times.setdefault("first_fragment", now)
            if i == first_end:
                times["first_sentence"] = now
            await asyncio.sleep(gap)
        times["last_fragment"] = time.perf_counter()
        await ws.send(json.dumps({"type": "close"}))
        await task
        times["end"] = time.perf_counter()
    return {
        "first_audio_after_first_fragment": times["first_audio"] - times["first_fragment"],
        "first_audio_after_first_sentence": times["first_audio"] - times["first_sentence"],
        "end_after_last_fragment": times["end"] - times["last_fragment"],
        "audio_seconds": samples / 24000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--gap_ms", type=float, default=20.0)
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--voice", default=None, help="default: the model's first speaker")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import uvicorn

    from cosyserve.api import create_app
    from cosyserve.engine.pipeline import load_model
    from cosyserve.settings import Settings

    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir, text_frontend="none")
    voice = args.voice or model.list_speakers()[0]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, Settings()), log_level="warning", lifespan="on"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/audio/speech/stream"
    results: dict[str, list[dict[str, float]]] = {"buffered": [], "bistream": []}
    asyncio.run(session(url, voice, args.text, 0.0, True, 0))  # warm-up
    asyncio.run(session(url, voice, args.text, 0.0, False, 0))
    for trial in range(args.trials):  # alternate, so both see the same machine load
        for name in results:
            results[name].append(
                asyncio.run(session(url, voice, args.text, args.gap_ms / 1000, name == "bistream", trial))
            )
    server.should_exit = True
    print(f"{args.model_dir}: {len(args.text.split())} words, {args.gap_ms:g} ms apart, {args.trials} trials (medians)")
    keys = list(results["buffered"][0])
    print(f"{'':10}" + "".join(f"{k:>34}" for k in keys))
    for name, rows in results.items():
        print(f"{name:10}" + "".join(f"{statistics.median(r[k] for r in rows):>34.3f}" for k in keys))
    report: dict[str, Any] = {
        n: {k: statistics.median(r[k] for r in rows) for k in keys} for n, rows in results.items()
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
