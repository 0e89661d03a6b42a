"""orchestrator.serve: fast tests of its pure parts, and live tests against the real server.

The ``live`` tests use the live session's one server (``vllm_server`` in conftest.py:
provisioned if needed, started once for the whole ``pytest -m live`` session).
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import openai
import pytest

from orchestrator import serve
from orchestrator.serve import (
    ServeError,
    ServerPaths,
    VLLMServer,
    is_provisioned,
    parse_prometheus,
)
from tests.live.livekit import GEN, HANG_GUARD_S, RAMBLE, note, seconds_until_idle

FEW_SHOT = (
    "Q: What is the capital of Belgium?\nA: Brussels\n\nQ: What is the capital of Peru?\n"
    "A: Lima\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the capital of "
    "France?\nA:"
)
STREAM_USAGE = {"include_usage": True, "continuous_usage_stats": True}


# --- fast: no server --------------------------------------------------------------------


def test_parse_prometheus_sums_series_across_labels() -> None:
    text = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 12.0
vllm:generation_tokens_total{engine="1",model_name="m"} 30.0
vllm:num_requests_running{engine="0",model_name="a,b {x}"} 2.0
vllm:kv_cache_usage_perc 0.5
process_start_time_seconds 1.7e9
weird_metric{le="+Inf"} NaN
"""
    got = parse_prometheus(text)
    assert got["vllm:generation_tokens_total"] == 42.0
    assert got["vllm:num_requests_running"] == 2.0
    assert got["vllm:kv_cache_usage_perc"] == 0.5
    assert got["process_start_time_seconds"] == 1.7e9
    assert "weird_metric" in got
    assert not any(k.startswith("#") for k in got)


def test_paths_default_to_solverify_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOLVERIFY_CACHE", str(tmp_path))
    paths = ServerPaths.at()
    assert paths.venv_dir == tmp_path / "vllm-venv"
    assert paths.model_dir == tmp_path / "models" / "gemma-3-270m"
    assert not is_provisioned(paths)


def _fake_provisioned(root: Path) -> ServerPaths:
    paths = ServerPaths.at(root)
    paths.python.parent.mkdir(parents=True)
    paths.python.touch()
    paths.marker_dir.mkdir(parents=True)
    for step in ("venv", "model", "verify"):
        paths.marker(step).write_text(json.dumps({"fingerprint": serve._fingerprint(step)}))
    return paths


def test_start_refuses_when_not_provisioned(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="not provisioned") as info:
        VLLMServer(ServerPaths.at(tmp_path)).start()
    assert "provision" in info.value.hint


def test_stale_marker_means_not_provisioned(tmp_path: Path) -> None:
    paths = _fake_provisioned(tmp_path)
    assert is_provisioned(paths)
    paths.marker("model").write_text(json.dumps({"fingerprint": "from-older-pins"}))
    assert not is_provisioned(paths)


def test_start_refuses_a_busy_port(tmp_path: Path) -> None:
    paths = _fake_provisioned(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServeError, match="already in use"):
            VLLMServer(paths, port=port).start()


def test_start_refuses_when_memory_is_short(tmp_path: Path) -> None:
    paths = _fake_provisioned(tmp_path)
    if serve.available_memory_gb() is None:
        pytest.skip("no /proc/meminfo here")
    with pytest.raises(ServeError, match="memory available"):
        VLLMServer(paths, min_available_memory_gb=1e6).start()


async def test_stop_is_idempotent_without_start(tmp_path: Path) -> None:
    server = VLLMServer(ServerPaths.at(tmp_path))
    await server.stop_async()
    await server.stop_async()
    assert not server.running


# --- live: the real server ---------------------------------------------------------------


@pytest.fixture
def server(vllm_server: VLLMServer) -> VLLMServer:
    return vllm_server


@pytest.mark.live
def test_server_answers_the_few_shot_prompt(server: VLLMServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    before = server.metrics()[GEN]
    out = client.completions.create(
        model=server.model_name, prompt=FEW_SHOT, max_tokens=12, temperature=0, stop="\n"
    )
    assert out.choices[0].text.strip() == "Paris"
    assert out.usage is not None
    assert server.metrics()[GEN] - before == out.usage.completion_tokens


@pytest.mark.live
def test_tokenizer_adds_bos_and_chat_template_renders(server: VLLMServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
    )
    # <bos> <start_of_turn> user \n Hi <end_of_turn> \n <start_of_turn> model \n
    assert out.usage is not None and out.usage.prompt_tokens == 10


@pytest.mark.live
async def test_a_client_that_breaks_off_a_stream_stops_the_server(server: VLLMServer) -> None:
    """A plain client that breaks out of a stream and closes it: the server aborts the
    request (once no request runs, nothing more is generated) and has counted at least
    what the last chunk read reported. It may have counted more, by as much as the client
    was slow to close: steps finished before it saw the disconnect, sent into socket
    buffers or not, which no chunk read reports (CI on Dec 3: 20 read, 55 counted). That
    is the gap the backend's settled cut closes (half-close, then read on to the stream's
    end): ``tests/live/test_live_accounting.py`` asserts it exact."""
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    before = server.metrics()[GEN]
    charged = 0
    stream = client.completions.create(
        model=server.model_name,
        prompt=RAMBLE,
        max_tokens=400,
        temperature=1,
        stream=True,
        extra_body={"stream_options": STREAM_USAGE, "ignore_eos": True},
    )
    with stream:
        for chunk in stream:
            assert chunk.usage is not None
            charged = chunk.usage.completion_tokens
            if charged >= 20:
                break
    took = await seconds_until_idle(server, limit=HANG_GUARD_S)
    after_cut = server.metrics()[GEN]
    await asyncio.sleep(0.5)
    assert server.metrics()[GEN] == after_cut, "tokens generated after the request ended"
    generated = after_cut - before
    note(f"plain client breaking off a stream: read {charged} tokens, the server counted "
         f"{generated:.0f} and was idle {took:.2f}s after the close")
    assert charged <= generated < 400
