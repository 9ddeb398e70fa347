"""The console in a real headless Chromium: an operator logs in, creates a tenant and a key,
the key works through the official openai SDK, the request shows on the usage page, revoking
the key stops the SDK; the playground draws an image; the tenant portal is fenced to its own
tenant; a form without its CSRF token is refused. Screenshots of every page are saved under
target/browser-screenshots/."""

import struct
import time
import zlib
import urllib.error
import urllib.parse
import urllib.request
import uuid

import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ADMIN_TOKEN


def login(d, base, credential):
    d.get(base + "/login")
    field = d.find_element(By.ID, "credential")
    field.send_keys(credential)
    field.send_keys(Keys.ENTER)
    WebDriverWait(d, 10).until(lambda d: "/login" not in d.current_url)


def fill(d, form, values):
    for name, value in values.items():
        el = form.find_element(By.NAME, name)
        if el.tag_name == "select":
            el.find_element(By.CSS_SELECTOR, f"option[value='{value}']").click()
        elif el.get_attribute("type") == "checkbox":
            if bool(value) != el.is_selected():
                el.click()
        else:
            el.clear()
            el.send_keys(value)


def form_with_button(d, text):
    for f in d.find_elements(By.TAG_NAME, "form"):
        for b in f.find_elements(By.CSS_SELECTOR, "button[type=submit]"):
            if b.text.strip() == text:
                return f, b
    raise AssertionError(f"no form with a {text!r} button on {d.current_url}")


def unlabeled_controls(d):
    """Visible form controls with no label: each must be reachable and named."""
    return d.execute_script("""
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(e => e.type !== 'hidden')
          .filter(e => !(e.closest('label') || e.getAttribute('aria-label') ||
                         (e.id && document.querySelector(`label[for="${e.id}"]`)) ||
                         (e.tagName === 'BUTTON' && e.textContent.trim())))
          .map(e => e.outerHTML);
    """)


def csp_errors(d):
    return [e["message"] for e in d.get_log("browser") if "Content Security Policy" in e["message"]]


def session_post(d, url, fields):
    """POSTs a form with the browser's session cookie but outside the browser (as a forged
    request would), answering (status, body)."""
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in d.get_cookies())
    req = urllib.request.Request(url, method="POST", data=urllib.parse.urlencode(fields).encode(),
                                 headers={"cookie": cookie,
                                          "content-type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def page_csrf(d):
    return d.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")


def test_operator_creates_a_tenant_and_key_that_works_until_revoked(gateway, browser_factory, shots):
    d = browser_factory()
    console = gateway.admin + "/console"
    d.get(console + "/")
    assert d.current_url.endswith("/console/login")
    shots(d, "01-login")
    login(d, console, ADMIN_TOKEN)
    assert d.find_element(By.TAG_NAME, "h1").text == "Overview"
    assert not unlabeled_controls(d)

    tenant = "acme-" + uuid.uuid4().hex[:6]
    d.get(console + "/tenants")
    form, button = form_with_button(d, "Create tenant")
    fill(d, form, {"id": tenant, "models": "dall-e-2, dall-e-3", "requests_per_minute": "100",
                   "budget_usd": "5", "budget_period": "daily"})
    button.click()
    WebDriverWait(d, 10).until(EC.text_to_be_present_in_element((By.TAG_NAME, "h1"), tenant))
    assert d.find_element(By.CSS_SELECTOR, ".budget meter") is not None
    shots(d, "04-tenant")

    form, button = form_with_button(d, "Create key")
    fill(d, form, {"name": "ci key", "manage_keys": True})
    button.click()
    secret_field = WebDriverWait(d, 10).until(EC.presence_of_element_located((By.ID, "secret")))
    secret = secret_field.get_attribute("value")
    assert secret.startswith("sk-ig-")
    key_id = secret.split("-")[2]
    shots(d, "05-new-key")
    # Shown once: the key's own page never carries the secret again.
    d.get(f"{console}/keys/{key_id}")
    assert secret not in d.page_source and secret.split("-")[3] not in d.page_source

    client = openai.OpenAI(base_url=gateway.main + "/v1", api_key=secret, max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="dall-e-2", prompt="a lighthouse at dusk", size="256x256", response_format="b64_json")
    request_id = raw.headers["x-request-id"]
    assert raw.parse().data[0].b64_json

    # The request is on the usage page within two seconds.
    started = time.monotonic()
    seen = False
    while time.monotonic() - started < 2.0:
        d.get(f"{console}/usage?tenant={tenant}")
        if request_id in d.page_source:
            seen = True
            break
        time.sleep(0.2)
    assert seen, f"request {request_id} not on the usage page after 2 s"
    shots(d, "06-usage")
    # The CSV link downloads exactly what is shown.
    csv_href = d.find_element(By.CSS_SELECTOR, "a[download]").get_attribute("href")
    assert "tenant=" + tenant in csv_href

    d.get(f"{console}/keys/{key_id}")
    form, button = form_with_button(d, "Revoke")
    button.click()
    WebDriverWait(d, 5).until(EC.alert_is_present()).accept()
    WebDriverWait(d, 10).until(lambda d: "/tenants/" in d.current_url)
    assert "revoked" in d.find_element(By.CSS_SELECTOR, f"tr[data-key='{key_id}']").text

    deadline = time.monotonic() + 5
    while True:
        try:
            client.images.generate(model="dall-e-2", prompt="again", size="256x256")
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the revoked key still works after 5 s"
        time.sleep(0.2)

    d.get(console + "/audit")
    audit = d.find_element(By.ID, "audit").text
    assert "key.revoke" in audit and "key.create" in audit and "tenant.create" in audit
    assert "admin:token:" in audit
    assert secret not in d.page_source
    shots(d, "08-audit")
    assert not csp_errors(d)


def png(width, height):
    """A real PNG (RGBA, grey) of the given size, from the standard library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80\x80\x80\xff" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_playground_draws_the_requested_size(gateway, browser_factory, shots, tmp_path):
    d = browser_factory()
    console = gateway.admin + "/console"
    login(d, console, ADMIN_TOKEN)
    d.get(console + "/playground")
    form = d.find_element(By.ID, "playground")
    fill(d, form, {"tenant": "demo", "model": "dall-e-2", "prompt": "a blue teapot", "size": "512x512"})
    assert not unlabeled_controls(d)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    img = WebDriverWait(d, 20).until(EC.presence_of_element_located((By.CSS_SELECTOR, "img.generated")))
    WebDriverWait(d, 10).until(lambda d: d.execute_script("return arguments[0].complete", img))
    size = d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    assert size == [512, 512]
    headers = d.find_element(By.CSS_SELECTOR, "table.headers").text
    assert "x-imagegate-backend sandbox" in headers
    assert "x-request-id" in headers
    shots(d, "07-playground")
    assert not csp_errors(d)

    # Edit: upload a picture through the page's file input, get the edited one back.
    picture = tmp_path / "photo.png"
    picture.write_bytes(png(300, 300))
    form = d.find_element(By.ID, "playground-edit")
    fill(d, form, {"tenant": "demo", "model": "dall-e-2", "prompt": "add a hat", "size": "256x256"})
    form.find_element(By.NAME, "image").send_keys(str(picture))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(d, 20).until(lambda d: "/playground/edit" in d.current_url)
    img = WebDriverWait(d, 20).until(EC.presence_of_element_located((By.CSS_SELECTOR, "img.generated")))
    WebDriverWait(d, 10).until(lambda d: d.execute_script("return arguments[0].complete", img))
    assert d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [256, 256]
    assert "Answer: 200" in d.page_source
    shots(d, "07b-playground-edit")


def test_every_ops_page_renders_labelled_and_is_screenshotted(gateway, browser_factory, shots):
    d = browser_factory()
    console = gateway.admin + "/console"
    login(d, console, ADMIN_TOKEN)
    for n, page in [("02", "overview"), ("03", "tenants"), ("09", "backends"), ("10", "keys"),
                    ("11", "config")]:
        d.get(f"{console}/{page}")
        assert d.find_element(By.TAG_NAME, "h1").text, page
        assert not unlabeled_controls(d), page
        shots(d, f"{n}-{page}")
    # The config page shows no secret: the admin token's hash is redacted.
    d.get(console + "/config")
    assert "[redacted]" in d.page_source
    # The overview updates itself: its timestamp moves without a reload.
    d.get(console + "/overview")
    first = d.find_element(By.CSS_SELECTOR, "#live .meta").text
    marker = d.execute_script("window.__kept = 1; return 1")
    WebDriverWait(d, 12).until(lambda d: d.find_element(By.CSS_SELECTOR, "#live .meta").text != first)
    assert d.execute_script("return window.__kept") == marker, "the page reloaded"
    # A phone-width screen.
    phone = browser_factory(width=390, height=844)
    login(phone, console, ADMIN_TOKEN)
    phone.get(console + "/overview")
    overflow = phone.execute_script("return document.documentElement.scrollWidth > window.innerWidth + 1")
    assert not overflow, "the overview scrolls sideways on a phone"
    shots(phone, "12-overview-phone")
    assert not csp_errors(d)


def test_portal_sees_only_its_own_tenant(gateway, browser_factory, shots):
    a, b = "ta-" + uuid.uuid4().hex[:6], "tb-" + uuid.uuid4().hex[:6]
    for t in (a, b):
        gateway.admin_api("POST", "/tenants", {"id": t, "models": ["dall-e-2"]})
    key_a = gateway.admin_api("POST", "/keys", {"tenant": a, "name": "admin of a", "manage_keys": True})
    key_b = gateway.admin_api("POST", "/keys", {"tenant": b, "name": "b's key"})
    reader = gateway.admin_api("POST", "/keys", {"tenant": a, "name": "read only"})

    d = browser_factory()
    portal = gateway.main + "/portal"
    login(d, portal, key_a["secret"])
    assert d.find_element(By.TAG_NAME, "h1").text == "Home"
    shots(d, "13-portal-home")
    d.get(portal + "/keys")
    assert key_a["id"] in d.page_source and key_b["id"] not in d.page_source
    shots(d, "14-portal-keys")

    # Another tenant's key, by id: not found, and it cannot be revoked.
    d.get(f"{portal}/keys/{key_b['id']}")
    assert "No such page" in d.page_source
    d.get(portal + "/keys")
    status, _ = session_post(d, f"{portal}/keys/{key_b['id']}/revoke", {"csrf": page_csrf(d)})
    assert status == 404
    assert gateway.admin_api("GET", f"/keys/{key_b['id']}")["revoked_at"] is None
    # Its usage page is fenced too: asking for the other tenant shows this one's.
    d.get(f"{portal}/usage?tenant={b}")
    assert f"tenant={a}" in d.find_element(By.CSS_SELECTOR, "a[download]").get_attribute("href")
    shots(d, "15-portal-usage")

    # A key without manage_keys sees usage only.
    ro = browser_factory()
    login(ro, portal, reader["secret"])
    ro.get(portal + "/keys")
    assert "cannot manage keys" in ro.page_source
    # Portal sessions do not open the ops console.
    d.get(gateway.admin + "/console/overview")
    assert d.current_url.endswith("/console/login")


def test_a_form_without_its_csrf_token_is_refused(gateway, browser_factory):
    d = browser_factory()
    console = gateway.admin + "/console"
    login(d, console, ADMIN_TOKEN)
    d.get(console + "/tenants")
    name = "csrf-" + uuid.uuid4().hex[:6]
    for fields in ({"id": name}, {"id": name, "csrf": "forged"}):
        status, body = session_post(d, console + "/tenants", fields)
        assert status == 403 and "CSRF" in body
    with pytest.raises(urllib.error.HTTPError) as missing:
        gateway.admin_api("GET", f"/tenants/{name}")
    assert missing.value.code == 404
    # The same form with the page's token works.
    status, _ = session_post(d, console + "/tenants", {"id": name, "csrf": page_csrf(d)})
    assert status in (200, 303)
    assert gateway.admin_api("GET", f"/tenants/{name}")["id"] == name
    # Login without the login form's token: refused before the credential is looked at.
    status, body = session_post(d, console + "/login", {"credential": ADMIN_TOKEN})
    assert status == 403


def test_session_cookie_is_httponly_strict_and_logout_ends_it(gateway, browser_factory):
    d = browser_factory()
    console = gateway.admin + "/console"
    login(d, console, ADMIN_TOKEN)
    cookie = next(c for c in d.get_cookies() if c["name"] == "ig_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and "expiry" in cookie
    assert d.execute_script("return document.cookie").find("ig_console=") < 0
    value = cookie["value"]
    form, button = form_with_button(d, "Log out")
    button.click()
    WebDriverWait(d, 10).until(lambda d: d.current_url.endswith("/console/login"))
    # The old cookie, replayed, no longer opens a page.
    req = urllib.request.Request(console + "/overview", headers={"cookie": f"ig_console={value}"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(req, timeout=5)
    assert e.value.code == 303 and e.value.headers["location"].endswith("/console/login")
