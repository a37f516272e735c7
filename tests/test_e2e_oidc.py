"""`st.login` against a small OpenID Connect provider on loopback, in headless Chromium.

The provider (below, test-only) serves discovery, an authorization endpoint that logs in one person
(carol@example.com) without asking, a token endpoint returning an RS256 id_token signed with joserfc
(Authlib's JOSE library), and its JWKS. Streamlit's own login code (Authlib as the client) does the rest: the app,
with no accounts file, shows only the provider's login button; after the round trip the chat is
Carol's (`oidc:carol@example.com` in the store), and Log out brings the login page back.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_e2e_accounts import chat_ready, login_form, page_text, start_app, stop_app  # noqa: F401
from test_e2e_browser import browsers, css, free_port, idle, pytestmark, send, shot, wait_for  # noqa: F401

from chatglm_core.store import ConversationStore

authlib = pytest.importorskip("authlib", reason="st.login needs Authlib: pip install -r requirements-dev.txt")

CLIENT_ID, CLIENT_SECRET = "workbench", "s3cret"
EMAIL = "carol@example.com"


class Provider:
    def __init__(self) -> None:
        from joserfc.jwk import RSAKey

        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
        self.codes: dict[str, str] = {}  # code -> nonce
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def id_token(self, nonce: str) -> str:
        from joserfc import jwt

        now = int(time.time())
        claims = {"iss": self.url, "sub": "carol-1", "aud": CLIENT_ID, "iat": now, "exp": now + 600,
                  "nonce": nonce, "email": EMAIL, "email_verified": True, "name": "Carol"}
        return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, self.key)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                q = dict(urllib.parse.parse_qsl(query))
                if path == "/.well-known/openid-configuration":
                    u = provider.url
                    self.reply(200, {"issuer": u, "authorization_endpoint": u + "/authorize",
                                     "token_endpoint": u + "/token", "jwks_uri": u + "/jwks",
                                     "response_types_supported": ["code"], "subject_types_supported": ["public"],
                                     "id_token_signing_alg_values_supported": ["RS256"],
                                     "scopes_supported": ["openid", "email", "profile"],
                                     "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                                               "client_secret_post"]})
                elif path == "/jwks":
                    self.reply(200, {"keys": [provider.key.as_dict(private=False)]})
                elif path == "/authorize" and q.get("client_id") == CLIENT_ID:
                    code = secrets.token_urlsafe(16)
                    provider.codes[code] = q.get("nonce", "")
                    back = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q["state"]})
                    self.reply(302, headers={"Location": back})
                else:
                    self.reply(404, {"error": "not_found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                form = dict(urllib.parse.parse_qsl(body))
                nonce = provider.codes.pop(form.get("code", ""), None)
                if self.path != "/token" or nonce is None:
                    self.reply(400, {"error": "invalid_grant"})
                    return
                self.reply(200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                                 "expires_in": 600, "id_token": provider.id_token(nonce)})

        return Handler


@pytest.fixture(scope="module")
def oidc_app(tmp_path_factory, test_data_dir):
    provider = Provider()
    data = tmp_path_factory.mktemp("oidc-data")
    port = free_port()
    secrets_toml = tmp_path_factory.mktemp("oidc-secrets") / "secrets.toml"
    secrets_toml.write_text(
        f'[auth]\nredirect_uri = "http://127.0.0.1:{port}/oauth2callback"\ncookie_secret = "{secrets.token_hex(16)}"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'
        f'server_metadata_url = "{provider.url}/.well-known/openid-configuration"\n')
    log = tmp_path_factory.mktemp("oidc-log") / "streamlit.log"
    proc, url = start_app(data, log, test_data_dir, address="127.0.0.1", port=port,
                          extra=["--secrets.files", str(secrets_toml)])
    yield url, data, log
    stop_app(proc)
    provider.server.shutdown()


def test_log_in_with_an_identity_provider(oidc_app, browsers):
    url, data, log = oidc_app
    driver = browsers("carol")
    driver.get(url)
    button = wait_for(driver, lambda d: idle(d) and [b for b in css(d, "button")
                                                     if b.text.strip() == "Log in with your identity provider"],
                      "the provider's login button")
    assert not css(driver, '[data-testid="stChatInputTextArea"]') and not css(driver, "input")
    button[0].click()
    wait_for(driver, chat_ready, "carol's chat after the provider's round trip")
    assert EMAIL in page_text(driver)
    send(driver, "Carol was here.", expect=2)
    (conv,) = ConversationStore(data / "conversations.sqlite3").list("oidc:" + EMAIL, "chat")
    assert conv.messages[0].content == "Carol was here."
    driver.refresh()  # Streamlit's own identity cookie keeps her logged in
    wait_for(driver, lambda d: chat_ready(d) and "Carol was here." in page_text(d), "carol after a refresh")
    shot(driver, "oidc-logged-in")
    next(b for b in css(driver, "button") if b.text.strip().endswith("Log out")).click()
    wait_for(driver, lambda d: idle(d) and "Log in with your identity provider" in page_text(d), "logged out")
