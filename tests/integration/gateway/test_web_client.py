"""The gateway serves the web client: its page at ``/``, its files under ``/web/``.

Only plain files inside the client folder are served, each with the content type of its
extension, ``nosniff`` and revalidation headers; anything else (traversal, hidden files,
unknown extensions, symlinks out of the folder) is a 404 with a ``google.rpc.Status``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.gateway.app import GatewayConfig
from services.gateway.web import CLIENT_DIR
from tests.helpers.tokens import SigningKey
from tests.integration.gateway.conftest import GatewayUnderTest, gateway_with_double


async def test_index_is_the_client_page(gw: GatewayUnderTest) -> None:
    reply = await gw.client.get("/")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.text == (CLIENT_DIR / "index.html").read_text()
    assert '<script type="module" src="/web/js/app.js">' in reply.text
    csp = reply.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["cache-control"] == "no-cache"
    assert reply.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/web/app.css", "text/css; charset=utf-8"),
        ("/web/js/app.js", "text/javascript; charset=utf-8"),
        ("/web/js/media.js", "text/javascript; charset=utf-8"),
        ("/web/icon.svg", "image/svg+xml"),
    ],
)
async def test_files_have_their_content_type(
    gw: GatewayUnderTest, path: str, content_type: str
) -> None:
    reply = await gw.client.get(path)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == content_type
    assert reply.content == (CLIENT_DIR / path.removeprefix("/web/")).read_bytes()
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["cache-control"] == "no-cache"
    assert "content-security-policy" not in reply.headers  # only the page needs one


async def test_every_module_the_page_imports_is_served(gw: GatewayUnderTest) -> None:
    # The client has no build step: what the browser fetches is what is in the folder.
    modules = sorted(p.relative_to(CLIENT_DIR) for p in CLIENT_DIR.rglob("*.js"))
    assert modules, "the client has modules"
    for module in modules:
        source = (CLIENT_DIR / module).read_text()
        for imported in re.findall(r'from "\./([a-z]+\.js)"', source):
            assert (CLIENT_DIR / module.parent / imported).is_file(), (module, imported)
        reply = await gw.client.get(f"/web/{module.as_posix()}")
        assert reply.status_code == 200, module
        assert reply.headers["content-type"].startswith("text/javascript"), module


async def test_etag_revalidation_answers_304(gw: GatewayUnderTest) -> None:
    first = await gw.client.get("/web/app.css")
    etag = first.headers["etag"]
    again = await gw.client.get("/web/app.css", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    weak = await gw.client.get("/web/app.css", headers={"If-None-Match": f'"x", W/{etag}'})
    assert weak.status_code == 304
    other = await gw.client.get("/web/app.css", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200


async def test_head_gives_length_without_body(gw: GatewayUnderTest) -> None:
    reply = await gw.client.head("/web/js/app.js")
    assert reply.status_code == 200
    assert reply.content == b""
    size = (CLIENT_DIR / "js" / "app.js").stat().st_size
    assert reply.headers["content-length"] == str(size)
    assert reply.headers["content-type"] == "text/javascript; charset=utf-8"


@pytest.mark.parametrize(
    "raw_path",
    [
        "/web/../app.py",
        "/web/%2e%2e/__init__.py",
        "/web/%2E%2E/%2E%2E/web/__init__.py",
        "/web/js/..%2f..%2f__init__.py",
        "/web/..%5c__init__.py",
        "/web/%2fetc%2fpasswd",
        "/web//etc/passwd",
        "/web/.hidden.js",
        "/web/js/.app.js",
        "/web/js/app.js%00.css",
        "/web/index.html/",
        "/web/",
        "/web/js",
        "/web/js/",
        "/web/missing.js",
        "/web/__init__.py",
        "/web/README",
    ],
)
async def test_paths_outside_the_client_files_are_404(gw: GatewayUnderTest, raw_path: str) -> None:
    # The raw path goes out as written (httpx would otherwise normalise the dots away).
    async with httpx.AsyncClient(base_url=gw.url) as client:
        request = client.build_request("GET", gw.url)
        request.url = request.url.copy_with(raw_path=raw_path.encode())
        reply = await client.send(request)
    assert reply.status_code == 404, raw_path
    body = reply.json()
    assert body["code"] == 5  # NOT_FOUND, as a google.rpc.Status like every API error
    assert "root:" not in reply.text and "import" not in reply.text


async def test_api_routes_are_untouched(gw: GatewayUnderTest) -> None:
    assert (await gw.client.get("/healthz")).json() == {"status": "ok"}
    assert (await gw.client.get("/openapi.json")).headers["content-type"] == "application/json"
    # A write to a static path is not a static request: the route table answers.
    assert (await gw.client.post("/web/app.css")).status_code == 404


@pytest.fixture
async def tmp_site(
    signing_key: SigningKey, tmp_path: Path
) -> AsyncIterator[tuple[GatewayUnderTest, Path]]:
    root = tmp_path / "client"
    (root / "js").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    (root / "js" / "ok.js").write_text("export const ok = 1;\n")
    secret = tmp_path / "secret.js"
    secret.write_text("export const secret = 1;\n")
    (root / "js" / "escape.js").symlink_to(secret)
    (root / "data.bin").write_bytes(b"\x00\x01")
    config = GatewayConfig(web_root=root)
    async with gateway_with_double(signing_key, config=config) as running:
        yield running, root


async def test_a_symlink_out_of_the_folder_is_not_followed(
    tmp_site: tuple[GatewayUnderTest, Path],
) -> None:
    gw, _ = tmp_site
    assert (await gw.client.get("/web/js/ok.js")).status_code == 200
    escaped = await gw.client.get("/web/js/escape.js")
    assert escaped.status_code == 404
    assert "secret" not in escaped.text


async def test_unknown_extensions_are_not_served(
    tmp_site: tuple[GatewayUnderTest, Path],
) -> None:
    gw, _ = tmp_site
    assert (await gw.client.get("/web/data.bin")).status_code == 404


async def test_a_file_edited_on_disk_is_served_fresh(
    tmp_site: tuple[GatewayUnderTest, Path],
) -> None:
    gw, root = tmp_site
    first = await gw.client.get("/web/js/ok.js")
    assert first.text == "export const ok = 1;\n"
    (root / "js" / "ok.js").write_text("export const ok = 22;\n")
    second = await gw.client.get("/web/js/ok.js", headers={"If-None-Match": first.headers["etag"]})
    assert second.status_code == 200
    assert second.text == "export const ok = 22;\n"
    assert second.headers["etag"] != first.headers["etag"]
    page = await gw.client.get("/")
    assert page.text == "<!doctype html><title>t</title>"
