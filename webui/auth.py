"""Who may use the app: the gate main.py runs before anything else, the login page, logout.

- On loopback (the default, 127.0.0.1) with no accounts and no `st.login` provider: anonymous, as
  before (conversations keyed by the browser id in the URL), but only under this machine's own names
  (localhost, 127.0.0.1): another Host is a proxy or a DNS-rebinding web page, and is refused.
- On any other address with neither accounts nor a provider: the app refuses to serve (a message
  on the page and on stderr) unless CHATGLM_ALLOW_ANONYMOUS=1, which prints a warning instead.
- With accounts (chatglm_core.users) or a provider (`[auth]` in .streamlit/secrets.toml): nothing
  but the login form until the user logs in; then `st.session_state["auth_owner"]` ("user:NAME" or
  "oidc:…") is what webui.state.client_id() returns, so conversations and the code interpreter's
  kernel belong to the account, not to a URL.

Where the login lives between page loads: a cookie holding an opaque session token
(chatglm_core.sessions), read from `st.context.cookies` (the browser sends it with the websocket's
handshake, so a refresh or a new tab stays logged in until the session expires). Streamlit has no
Python call to set a cookie, so a one-line script in `st.html(unsafe_allow_javascript=True)` sets it
(SameSite=Strict, Secure on https; not HttpOnly, which only the server could set). Not the URL: a
URL is copied, shared, bookmarked and logged, and whoever has it would be logged in.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Mapping

import streamlit as st

from chatglm_core.errors import ConfigError
from chatglm_core.sessions import SessionStore
from chatglm_core.throttle import LoginThrottle
from chatglm_core.users import UserStore
from webui import state

OWNER = "auth_owner"  # st.session_state key: the logged-in account's owner id
_TOKEN = "auth_token"  # this session's token (to re-check it each run and revoke it on logout)
_SET_COOKIE = "auth_set_cookie"  # the token the browser still has to store
_CLEAR_COOKIE = "auth_clear_cookie"  # logged out here: the cookie this connection came with is stale
_CLEAR_NOW = "auth_clear_now"  # the browser still has to delete its cookie
_printed: set[str] = set()  # messages already printed to stderr by this process


# --- process-wide ------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def users() -> UserStore:
    return UserStore.from_settings(state.settings())


@st.cache_resource(show_spinner=False)
def sessions() -> SessionStore:
    return SessionStore.from_settings(state.settings())


@st.cache_resource(show_spinner=False)
def throttle() -> LoginThrottle:
    return LoginThrottle(free_failures=state.settings().login_free_failures)


def is_loopback(address: str | None) -> bool:
    """Whether the server address only accepts connections from this machine (unset: all interfaces)."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(address: str | None, *, has_accounts: bool, has_provider: bool,
                     allow_anonymous: bool) -> str | None:
    """Why the app must not serve (reachable from the network, no way to log in), else None."""
    if is_loopback(address) or has_accounts or has_provider or allow_anonymous:
        return None
    where = f"address {address}" if address else "all network interfaces"
    return (f"The app listens on {where} but has no accounts, so anyone who can reach it could use the model "
            "and run code. Add an account (`python -m chatglm_core.users add NAME`), configure `st.login` in "
            ".streamlit/secrets.toml, listen on 127.0.0.1 (`make run` without HOST) and use an SSH tunnel, or "
            "set CHATGLM_ALLOW_ANONYMOUS=1 to serve it to everyone anyway.")


def oidc_providers() -> list[str | None]:
    """The `st.login` providers configured in secrets.toml (None: the unnamed one); [] when none."""
    try:
        if not st.secrets.load_if_toml_exists():
            return []
        auth = st.secrets.get("auth")
    except Exception:  # an unreadable secrets file means no provider; Streamlit reports the file itself
        return []
    if not isinstance(auth, Mapping) or not {"redirect_uri", "cookie_secret"} <= set(auth):
        return []
    named: list[str | None] = [k for k, v in auth.items() if isinstance(v, Mapping) and "client_id" in v]
    return named or ([None] if "client_id" in auth else [])


def _print_once(message: str) -> None:
    if message not in _printed:
        _printed.add(message)
        print(message, file=sys.stderr, flush=True)


# --- the gate ----------------------------------------------------------------------------------
def gate() -> None:
    """Return when this session may use the app; otherwise draw the refusal or the login page and stop."""
    settings = state.settings()
    address = st.get_option("server.address")
    providers = oidc_providers()
    try:
        has_accounts = bool(users())
    except ConfigError as e:  # a damaged accounts file: closed, saying how to fix it, until it is fixed
        _print_once(f"ChatGLM workbench refuses to serve: {e}")
        st.error(str(e))
        st.stop()
    problem = exposure_problem(address, has_accounts=has_accounts, has_provider=bool(providers),
                               allow_anonymous=settings.allow_anonymous)
    if problem:
        _print_once("ChatGLM workbench refuses to serve: " + problem)
        st.error(problem)
        st.stop()
    if not has_accounts and not providers:
        host = _request_host()
        if not settings.allow_anonymous and host and not is_loopback(host):
            # on loopback, a page on this machine reached under another name is a proxy or DNS rebinding
            # (a web site pointing its own name at 127.0.0.1 to drive the app from the visitor's browser)
            st.error(f"This app has no login and answers only to localhost / 127.0.0.1, not to {host!r}. "
                     "To serve it under another name, add an account (`python -m chatglm_core.users add NAME`) "
                     "or set CHATGLM_ALLOW_ANONYMOUS=1.")
            st.stop()
        if not is_loopback(address):
            _print_once(f"WARNING: CHATGLM_ALLOW_ANONYMOUS is set: the app on {address or 'all interfaces'} "
                        "has no login; anyone who can reach it can use the model and run code.")
        if OWNER in st.session_state:  # the last account was just removed: don't carry its state over
            _forget_session()
        return
    owner = _current_owner()
    if owner:
        st.session_state[OWNER] = owner
        _account_bar(owner)
        return
    st.session_state.pop(OWNER, None)
    _login_page(providers)
    st.stop()


def may_act() -> bool:
    """For widget callbacks, which Streamlit runs before `gate`: whether this session still acts as its
    logged-in owner (False once its login has ended: the gate then shows the login page)."""
    owner = st.session_state.get(OWNER)
    return owner is None or _current_owner() == owner


def _request_host() -> str:
    """The host name the browser used (the Host header, without the port); "" when there is none (tests)."""
    host = st.context.headers.get("Host")
    host = host.strip() if isinstance(host, str) else ""
    if host.startswith("["):  # [::1]:8501
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie_name() -> str:
    # cookies are per host, not per port: two apps on one machine must not overwrite each other's
    return f"chatglm_session_{st.get_option('server.port')}"


def _current_owner() -> str | None:
    """The owner id this session is logged in as (checked again every run), or None."""
    if _oidc_logged_in():
        return "oidc:" + str(st.user.get("email") or st.user.get("sub"))
    cookie = None if st.session_state.get(_CLEAR_COOKIE) else st.context.cookies.get(_cookie_name())
    token = st.session_state.get(_TOKEN) or (cookie if isinstance(cookie, str) else None)
    name = sessions().user_for(token, users().tag) if token else None
    if name is None:
        if st.session_state.get(_TOKEN):  # expired, or logged out / password changed elsewhere
            _forget_session()
            st.session_state["auth_note"] = "Your session has ended: log in again."
        return None
    st.session_state[_TOKEN] = token
    return "user:" + name


def _oidc_logged_in() -> bool:
    return bool(oidc_providers()) and bool(st.user.is_logged_in)


def _account_bar(owner: str) -> None:
    with st.sidebar:
        who = owner.split(":", 1)[1]
        c1, c2 = st.columns([3, 2], vertical_alignment="center")
        c1.caption(f"Logged in as **{who}**")
        c2.button("Log out", key="auth_logout", icon=":material/logout:", on_click=_logout)
        token = st.session_state.get(_SET_COOKIE)
        if token:
            _cookie_script(token, int(sessions().ttl_seconds))


def _logout() -> None:
    token = st.session_state.get(_TOKEN)
    if token:
        sessions().revoke(token)
    _forget_session()
    if _oidc_logged_in():
        st.logout()


def _forget_session() -> None:
    """Drop everything this browser session held (open conversations, uploads…): the next login may be
    someone else's. The browser's cookie is cleared on the login page."""
    from webui.turn import stop_generation

    stop_generation()  # a reply in flight ends here, kept under the account it belongs to
    st.session_state.clear()
    st.session_state[_CLEAR_COOKIE] = st.session_state[_CLEAR_NOW] = True


def _cookie_script(value: str, max_age: int) -> None:
    cookie = json.dumps(f"{_cookie_name()}={value}; Path=/; Max-Age={max_age}; SameSite=Strict")
    st.html(f'<script>document.cookie = {cookie} + (location.protocol === "https:" ? "; Secure" : "");</script>',
            unsafe_allow_javascript=True)


# --- the login page ----------------------------------------------------------------------------
def _login_page(providers: list[str | None]) -> None:
    st.title("ChatGLM Workbench")
    if st.session_state.pop(_CLEAR_NOW, False):  # once: later runs must not clear a newer tab's cookie
        with st.sidebar:
            _cookie_script("", 0)
    note = st.session_state.pop("auth_note", None)
    if note:
        st.info(note)
    if bool(users()):
        with st.form("login"):
            name = st.text_input("Username", autocomplete="username")
            password = st.text_input("Password", type="password", autocomplete="current-password")
            submitted = st.form_submit_button("Log in", type="primary")
        if submitted:
            _try_login(name, password)
    for provider in providers:
        label = f"Log in with {provider}" if provider else "Log in with your identity provider"
        if st.button(label, key=f"oidc_{provider}"):
            st.login(provider) if provider else st.login()


def _try_login(name: str, password: str) -> None:
    keys = _throttle_keys(name)
    wait = throttle().wait_seconds(*keys)
    if wait > 0:
        st.error(f"Too many failed logins: try again in {wait:.0f} s.")
        return
    tag = users().verify(name, password)
    if tag is None:
        locked = throttle().failed(*keys)
        st.error("Wrong username or password." + (f" Try again in {locked:.0f} s." if locked else ""))
        return
    throttle().succeeded(keys[0])  # the account's count; the client's keeps counting (see throttle.py)
    account = name.strip().lower()
    token = sessions().issue(account, tag)
    st.session_state.update({_TOKEN: token, _SET_COOKIE: token, OWNER: "user:" + account})
    st.session_state.pop(_CLEAR_COOKIE, None)
    st.rerun()


def _throttle_keys(name: str) -> tuple[str, str]:
    ip = st.context.ip_address
    client = ip if isinstance(ip, str) else "local"  # None on loopback
    return "user:" + name.strip().lower(), "client:" + client


def preflight(address: str | None) -> int:
    """`python -m webui.auth ADDRESS` (make run): 2 with the message when the app would refuse, else 0."""
    from chatglm_core.settings import load_settings

    try:
        s = load_settings()
        has_accounts = bool(UserStore.from_settings(s))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = exposure_problem(address, has_accounts=has_accounts, has_provider=bool(oidc_providers()),
                               allow_anonymous=s.allow_anonymous)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(address) and not has_accounts and not oidc_providers():
        print(f"WARNING: CHATGLM_ALLOW_ANONYMOUS is set: the app on {address} has no login.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(preflight(sys.argv[1] if len(sys.argv) > 1 else None))
