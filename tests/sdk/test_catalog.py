"""The model catalog against the installed `openai` package: every model name the SDK knows is
in the catalog (or listed there as shut down), and the SDK's newest fields work through the
gateway. The next SDK that adds a model name turns the first test red."""

import inspect
import json
import re
import subprocess
import typing

import openai
import pytest
from openai import OpenAI
from openai.types import image_model

from conftest import BIN, JSON_BODIES, ROOT


@pytest.fixture
def client(gateway):
    return OpenAI(api_key="sk-imagegate-demo", base_url=f"{gateway}/v1", max_retries=0)


def catalog():
    out = subprocess.run([BIN, "models", "--catalog", "--json", "--config", str(ROOT / "gateway.yaml")],
                         check=True, capture_output=True, text=True)
    return {e["name"]: e for e in json.loads(out.stdout)}


def sdk_shut_down():
    """The names the SDK's ImageModel docstring lists as shut down or retired."""
    source = inspect.getsource(image_model)
    deprecated = source.split("Deprecated values:", 1)[1]
    names = set()
    for item in re.split(r"\n- ", deprecated):
        if re.search(r"shut down|retired", item):
            names.update(re.findall(r'"([^"]+)"', item.split(":", 1)[0]))
    return names


def test_every_sdk_image_model_is_in_the_catalog():
    names = typing.get_args(image_model.ImageModel)
    assert len(names) >= 10, names
    entries = catalog()
    missing = [n for n in names if n not in entries]
    assert not missing, f"the openai package {openai.__version__} knows models the catalog lacks: {missing}"
    shut = sdk_shut_down()
    assert {"gpt-image-1", "dall-e-2", "dall-e-3"} <= shut, shut
    for name in shut:
        assert entries[name]["shutdown_date"], f"{name} is shut down per the SDK; the catalog has no date"
        assert entries[name]["replacement"] in entries, name
    # Snapshots resolve to their family's entry.
    assert entries["gpt-image-2.5-sunburst-2026-09-08"]["family_entry"] == "gpt-image-2.5-sunburst"


def test_the_sdk_model_type_reads_the_shutdown_date(client):
    assert client.models.retrieve("dall-e-3").shutdown_date == "2026-05-12"
    assert client.models.retrieve("gpt-image-2").shutdown_date is None


def test_gif_output_with_its_fields_reaches_the_upstream(client):
    resp = client.images.generate(model="gpt-image-2.5-sunburst", prompt="a spinning top",
                                  output_format="gif", frame_count=4, frame_duration_ms=120)
    assert resp.output_format == "gif"
    sent = JSON_BODIES[-1]
    assert (sent["output_format"], sent["frame_count"], sent["frame_duration_ms"]) == ("gif", 4, 120)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gpt-image-2.5-sunburst", prompt="x", output_format="gif", stream=True)
    assert e.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gpt-image-2", prompt="x", output_format="gif")
    assert e.value.param == "output_format"


def test_svg_needs_one_image(client):
    resp = client.images.generate(model="gpt-image-2.5-sunburst", prompt="a logo", output_format="svg",
                                  svg={"model": "gpt-5", "reasoning": {"effort": "low"}})
    assert resp.data
    assert JSON_BODIES[-1]["svg"] == {"model": "gpt-5", "reasoning": {"effort": "low"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="gpt-image-2.5-sunburst", prompt="x", output_format="svg", n=2)
    assert e.value.param == "n"


def test_a_field_the_gateway_does_not_know_passes_to_gpt_image_and_not_to_dall_e(client):
    client.images.generate(model="gpt-image-2", prompt="x", extra_body={"prompt_rewriter": {"mode": "off"}})
    assert JSON_BODIES[-1]["prompt_rewriter"] == {"mode": "off"}
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="dall-e-3", prompt="x", extra_body={"prompt_rewriter": {"mode": "off"}})
    assert e.value.param == "prompt_rewriter"


def test_a_shut_down_model_nobody_routed_names_its_replacement(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="gpt-image-1", prompt="x")
    assert e.value.code == "model_not_found"
    assert "gpt-image-2.5-sunburst" in e.value.message
