"""The official `openai` Python SDK, unchanged, against imagegate."""

import base64
import struct
import threading
import time
import urllib.request

import openai
import pytest
from openai import OpenAI


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def client(gateway):
    return OpenAI(api_key="sk-imagegate-demo", base_url=f"{gateway}/v1", max_retries=0)


def test_generate_url_returns_a_real_png_of_the_requested_size(client):
    resp = client.images.generate(model="dall-e-3", prompt="A cute cat walking in space",
                                  size="1792x1024", quality="hd", style="natural", n=1)
    assert resp.created > 0
    assert len(resp.data) == 1
    assert resp.data[0].revised_prompt == "A cute cat walking in space"
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert r.headers["content-type"] == "image/png"
        assert png_size(r.read()) == (1792, 1024)


def test_generate_b64_json_returns_the_bytes(client):
    resp = client.images.generate(prompt="a lighthouse", n=2, size="256x256", response_format="b64_json")
    assert len(resp.data) == 2
    images = [base64.b64decode(d.b64_json) for d in resp.data]
    assert all(png_size(i) == (256, 256) for i in images)
    assert images[0] != images[1]
    assert resp.data[0].url is None


def test_models_list(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["dall-e-2", "dall-e-3", "dall-e-3-on-gpt", "flux-kontext-pro", "gemini-3-pro-image",
                   "gpt-image-1.5", "gpt-image-2", "gpt-image-2.5-sunburst", "remote", "remote-throttled",
                   "slow"]


def test_400_is_bad_request_error_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="dall-e-3", prompt="x", n=2)
    assert e.value.status_code == 400
    assert e.value.param == "n"
    assert e.value.type == "invalid_request_error"
    assert e.value.request_id and e.value.request_id.startswith("req_")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="dall-e-2", prompt="x", size="1792x1024")
    assert e.value.param == "size"


def test_401_is_authentication_error(gateway):
    bad = OpenAI(api_key="sk-not-a-key", base_url=f"{gateway}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.images.generate(prompt="x")
    assert e.value.code == "invalid_api_key"


def test_404_is_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-9", prompt="x")
    assert e.value.code == "model_not_found"


def test_429_from_a_tenant_limit_is_rate_limit_error(gateway):
    tight = OpenAI(api_key="sk-tight-limit", base_url=f"{gateway}/v1", max_retries=0)
    tight.images.generate(prompt="first", size="256x256")
    with pytest.raises(openai.RateLimitError) as e:
        tight.images.generate(prompt="second", size="256x256")
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_upstream_429_is_rate_limit_error_then_the_parked_pool_is_503(client):
    with pytest.raises(openai.RateLimitError) as e:
        client.images.generate(model="remote-throttled", prompt="upstream-429")
    assert e.value.response.headers["retry-after"] == "2"
    # The only backend is parked until its retry-after: the pool answers 503 meanwhile.
    with pytest.raises(openai.InternalServerError) as e:
        client.images.generate(model="remote-throttled", prompt="upstream-429")
    assert e.value.status_code == 503
    assert e.value.code == "no_backend_available"
    assert float(e.value.response.headers["retry-after"]) >= 1


def test_upstream_content_policy_is_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="remote", prompt="unsafe")
    assert e.value.code == "content_policy_violation"


def test_upstream_500_is_internal_server_error(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.images.generate(model="remote", prompt="boom")
    assert e.value.status_code == 502


def test_gpt_image_model_plain(client):
    resp = client.images.generate(model="gpt-image-2", prompt="a logo", size="1536x864", quality="high")
    assert resp.usage.output_tokens == 4160
    assert resp.output_format == "png"
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (1536, 864)


def test_gpt_image_model_streamed(client):
    events = list(client.images.generate(model="gpt-image-2", prompt="a logo", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].usage.total_tokens == 4210
    assert png_size(base64.b64decode(events[-1].b64_json)) == (1024, 1024)


def test_dalle3_client_on_a_gpt_image_upstream(client):
    resp = client.images.generate(model="dall-e-3-on-gpt", prompt="a castle", size="1792x1024",
                                  quality="hd", style="natural")
    assert resp.data[0].revised_prompt.startswith("a castle Style: natural")
    assert resp.usage is None, "DALL-E answers keep the contract's shape"
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert png_size(r.read()) == (1792, 1024)


def test_sdk_retry_honours_retry_after_and_then_succeeds(gateway):
    # 30 requests per minute with a burst of 1: one request per 2 s. The SDK's own retry reads
    # our 429's retry-after, waits, and the retry goes through.
    quick = OpenAI(api_key="sk-quick-limit", base_url=f"{gateway}/v1", max_retries=3)
    quick.images.generate(prompt="first", size="256x256")
    raw = OpenAI(api_key="sk-quick-limit", base_url=f"{gateway}/v1", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        raw.images.generate(prompt="refused", size="256x256")
    assert e.value.code == "rate_limit_exceeded"
    wait = int(e.value.response.headers["retry-after"])
    assert 1 <= wait <= 2
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    started = time.monotonic()
    answer = quick.images.generate(prompt="retried", size="256x256")
    assert answer.data[0].url
    # It waited for the limit (about 2 s) rather than its own sub-second first backoff.
    assert time.monotonic() - started >= 1.0


def test_exhausted_budget_is_rate_limit_error_insufficient_quota_not_retried(gateway):
    broke = OpenAI(api_key="sk-broke-budget", base_url=f"{gateway}/v1", max_retries=0)
    broke.images.generate(prompt="the only one", size="256x256")
    with pytest.raises(openai.RateLimitError) as e:
        broke.images.generate(prompt="one too many", size="256x256")
    assert e.value.code == "insufficient_quota"
    assert e.value.type == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"


def test_idempotency_key_replays_conflicts_and_mismatches(client, gateway):
    key = {"Idempotency-Key": "sdk-order-1"}
    first = client.images.generate(prompt="idem", size="256x256", extra_headers=key)
    again = client.images.generate(prompt="idem", size="256x256", extra_headers=key)
    assert again.created == first.created
    assert again.data[0].url == first.data[0].url
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="another body", size="256x256", extra_headers=key)

    slow_key = {"Idempotency-Key": "sdk-order-2"}
    results = {}

    def run_first():
        results["first"] = client.images.generate(model="slow", prompt="slow", size="256x256",
                                                  extra_headers=slow_key)

    t = threading.Thread(target=run_first)
    t.start()
    time.sleep(0.5)
    with pytest.raises(openai.ConflictError):
        client.images.generate(model="slow", prompt="slow", size="256x256", extra_headers=slow_key)
    t.join()
    assert results["first"].data[0].url


# === edits and variations ===

from conftest import UPLOADS, png  # noqa: E402


def mask_left_half(width, height):
    """An RGBA PNG: transparent (edit here) on the left half, opaque on the right."""
    import zlib
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"".join(b"\x00\x00\x00" + (b"\x00" if x < width // 2 else b"\xff") for x in range(width))
    raw = b"".join(b"\x00" + row for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_edit_with_one_image_returns_a_png_of_the_size(client):
    resp = client.images.edit(model="dall-e-2", image=("in.png", png(256, 256), "image/png"),
                              prompt="add a red sun", size="256x256", response_format="b64_json")
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (256, 256)


def test_edit_with_a_mask(client):
    resp = client.images.edit(image=("in.png", png(256, 256), "image/png"),
                              mask=("mask.png", mask_left_half(256, 256), "image/png"),
                              prompt="a window", size="256x256", n=2)
    assert len(resp.data) == 2
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert png_size(r.read()) == (256, 256)


def test_edit_with_three_images_reaches_the_upstream_as_image_array(client):
    images = [(f"{i}.png", png(64 + 16 * i, 64), "image/png") for i in range(3)]
    # input_fidelity: gpt-image-1.5 takes it (gpt-image-2 does not, per the catalog).
    resp = client.images.edit(model="gpt-image-1.5", image=images, prompt="combine them",
                              input_fidelity="high")
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (1024, 1024)
    sent = UPLOADS[-1]
    assert sent["path"] == "/v1/images/edits"
    assert [f[0] for f in sent["files"]] == ["image[]"] * 3
    assert [f[2] for f in sent["files"]] == [img[1] for img in images]
    assert sent["fields"]["input_fidelity"] == "high"


def test_edit_streamed(client):
    stream = client.images.edit(model="gpt-image-2", image=("in.png", png(64, 64), "image/png"),
                                prompt="a cat", stream=True, partial_images=1)
    kinds = [event.type for event in stream]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks variations deprecated
def test_create_variation(client):
    resp = client.images.create_variation(image=("in.png", png(256, 256), "image/png"), n=2,
                                          size="512x512", response_format="b64_json")
    assert [png_size(base64.b64decode(d.b64_json)) for d in resp.data] == [(512, 512)] * 2


@pytest.mark.parametrize("kwargs, param", [
    ({"image": ("in.png", png(256, 256), "image/png"),
      "mask": ("mask.png", mask_left_half(128, 128), "image/png")}, "mask"),
    ({"image": ("notes.png", b"not an image at all", "image/png")}, "image"),
    ({"model": "gpt-image-2", "image": [(f"{i}.png", png(16, 16), "image/png") for i in range(17)]}, "image"),
    ({"image": ("in.png", png(256, 256), "image/png"), "background": "transparent"}, "background"),
])
def test_edit_errors_are_bad_request_errors_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(prompt="x", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_node_sdk_generates_edits_and_varies(gateway, tmp_path):
    """The official Node package (tests/node, installed by scripts/test.sh) against the same
    gateway: its multipart bodies are built by undici, not httpx."""
    import shutil
    import subprocess
    from pathlib import Path
    node_dir = Path(__file__).resolve().parents[1] / "node"
    if shutil.which("node") is None or not (node_dir / "node_modules" / "openai").exists():
        pytest.skip("node or the openai npm package is missing (scripts/test.sh installs them)")
    (tmp_path / "in.png").write_bytes(png(256, 256))
    (tmp_path / "mask.png").write_bytes(mask_left_half(256, 256))
    done = subprocess.run(["node", str(node_dir / "sdk.mjs"), gateway, str(tmp_path / "in.png"),
                           str(tmp_path / "mask.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "ok" in done.stdout


# === other providers, through the same SDK calls ===

@pytest.mark.parametrize("model", ["flux-kontext-pro", "gemini-3-pro-image"])
def test_generate_through_a_provider_in_both_formats(client, model):
    resp = client.images.generate(model=model, prompt="a calm sea", size="1792x1024",
                                  response_format="b64_json")
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (1792, 1024)
    resp = client.images.generate(model=model, prompt="a calm sea", size="1024x1024", n=2)
    assert len(resp.data) == 2
    with urllib.request.urlopen(resp.data[0].url) as r:
        assert png_size(r.read()) == (1024, 1024)


def test_edit_through_gemini(client):
    resp = client.images.edit(model="gemini-3-pro-image", image=("in.png", png(256, 256), "image/png"),
                              prompt="make it night", response_format="b64_json")
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (1024, 1024)
