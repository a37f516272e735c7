"""YAML custom tools: every load error names file, tool and field; python and http tools run."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from chatglm_core.errors import ConfigError
from chatglm_core.settings import Settings
from tools import build_registry
from tools.builtins import register_builtins
from tools.registry import ToolRegistry
from tools.yaml_tools import BUNDLED, load_all

GOOD_PARAMS = "{type: object, properties: {q: {type: string}}, required: [q]}"


def write(tmp_path: Path, body: str, name: str = "tools.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def python_module(tmp_path: Path, source: str) -> str:
    """A module next to the YAML file (imported from the file's folder); returns its name."""
    name = "yamltool_" + uuid.uuid4().hex[:8]
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    return name


def load_error(tmp_path: Path, body: str) -> str:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        ToolRegistry().load_yaml(path)
    assert str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("entry, expected", [
    # unknown key
    (f"name: t1\n    description: d\n    parameters: {GOOD_PARAMS}\n    manual: true\n    colour: red",
     ["'t1'", "colour: unknown key"]),
    # missing fields
    ("name: t2\n    manual: true", ["'t2'", "description: missing required field"]),
    ("description: d\n    manual: true", ["'#1'", "name: missing required field"]),
    # bad name
    ("name: 'has space'\n    description: d\n    manual: true", ["'has space'", "name:", "pattern"]),
    # no way / two ways to run it
    ("name: t3\n    description: d", ["'t3'", "exactly one of python"]),
    ("name: t4\n    description: d\n    manual: true\n    python: os:getcwd", ["'t4'", "exactly one of python"]),
    # invalid JSON Schema (checked with the meta-schema)
    ("name: t5\n    description: d\n    manual: true\n    parameters: {type: object, properties: {q: {type: strng}}}",
     ["'t5'", "parameters", "properties/q/type"]),
    ("name: t6\n    description: d\n    manual: true\n    parameters: {type: string}",
     ["'t6'", "parameters", "\"type\": \"object\""]),
    # unimportable callables
    ("name: t7\n    description: d\n    python: no_such_module_xyz:f", ["'t7'", "python", "cannot import 'no_such_module_xyz'"]),
    ("name: t8\n    description: d\n    python: json:no_such_function", ["'t8'", "python", "no attribute 'no_such_function'"]),
    ("name: t9\n    description: d\n    python: json", ["'t9'", "python", "package.module:function"]),
    # callable vs parameters mismatch
    ("name: t10\n    description: d\n    python: posixpath:basename\n    parameters: {type: object, properties: {zz: {type: string}}}",
     ["'t10'", "parameters", "does not accept zz"]),
    ("name: t10b\n    description: d\n    python: posixpath:basename\n    parameters: {type: object, properties: {p: {type: string}}}",
     ["'t10b'", "parameters", "needs p"]),
    # http spec
    ("name: t11\n    description: d\n    http: {url: 'ftp://x'}", ["'t11'", "http.url", "http://"]),
    ("name: t12\n    description: d\n    http: {url: 'http://x', verb: GET}", ["'t12'", "http.verb: unknown key"]),
    ("name: t13\n    description: d\n    manual: true\n    timeout: -1", ["'t13'", "timeout"]),
])
def test_each_error_names_file_tool_and_field(tmp_path, entry, expected):
    message = load_error(tmp_path, "tools:\n  - " + entry + "\n")
    for part in expected:
        assert part in message


def test_duplicate_names_in_one_file(tmp_path):
    entry = "  - {name: dup, description: d, manual: true}\n"
    assert "'dup': name: defined twice" in load_error(tmp_path, "tools:\n" + entry + entry)


def test_duplicate_of_a_builtin(tmp_path):
    registry = ToolRegistry()
    register_builtins(registry)
    path = write(tmp_path, "tools:\n  - {name: calculator, description: d, manual: true}\n")
    with pytest.raises(ConfigError, match="'calculator': name: already defined by builtin"):
        registry.load_yaml(path)


@pytest.mark.parametrize("body, expected", [
    ("tools: [\n", "not valid YAML at line"),
    ("- name: x\n", "top-level keys must be tools"),
    ("tools: {name: x}\n", "top-level keys must be tools"),
    ("tools:\n  - just a string\n", "must be a mapping"),
])
def test_file_shape_errors(tmp_path, body, expected):
    assert expected in load_error(tmp_path, body)


def test_all_problems_of_a_file_in_one_error_and_nothing_registered(tmp_path):
    body = ("tools:\n  - {name: ok_tool, description: d, manual: true}\n"
            "  - {name: bad1, manual: true}\n  - {name: bad2, description: d, python: nope_mod_q:f}\n")
    registry = ToolRegistry()
    with pytest.raises(ConfigError) as err:
        registry.load_yaml(write(tmp_path, body))
    assert "'bad1'" in str(err.value) and "'bad2'" in str(err.value)
    assert "ok_tool" not in registry  # all or none


def test_bad_file_never_disables_builtins_or_other_files(tmp_path):
    good = write(tmp_path, "tools:\n  - {name: good_one, description: d, manual: true}\n", "good.yaml")
    bad = write(tmp_path, "tools:\n  - {name: broken}\n", "bad.yaml")
    missing = tmp_path / "missing.yaml"
    settings = Settings(tools=f"{bad}{__import__('os').pathsep}{missing}{__import__('os').pathsep}{good}")
    registry = build_registry(settings)
    assert {"calculator", "get_weather", "convert_units", "good_one"} <= set(registry.names())
    assert len(registry.load_errors) == 2
    assert str(bad) in str(registry.load_errors[0]) and "'broken'" in str(registry.load_errors[0])
    assert str(missing) in str(registry.load_errors[1]) and "cannot read" in str(registry.load_errors[1])


def test_bundled_file_loads_and_its_python_tool_runs():
    registry = ToolRegistry()
    assert load_all(registry, Settings()) == []
    assert BUNDLED.exists()
    result = registry.dispatch("convert_units", {"value": 100, "from_unit": "C", "to_unit": "F"})
    assert result.ok and json.loads(result.content) == {"value": 212.0, "unit": "F"}
    assert registry.get("ask_colleague").manual


def test_python_tool_next_to_the_yaml(tmp_path):
    module = python_module(tmp_path, "def shout(q, times=1):\n    return {'said': (q.upper() + '!') * times}\n")
    path = write(tmp_path, f"tools:\n  - name: shout\n    description: Shout.\n    python: {module}:shout\n"
                           "    parameters: {type: object, properties: {q: {type: string}, times: {type: integer}},"
                           " required: [q]}\n    timeout: 2\n")
    registry = ToolRegistry()
    assert registry.load_yaml(path) == ["shout"]
    assert registry.get("shout").timeout == 2
    assert registry.dispatch("shout", {"q": "hi", "times": 2}).content == '{"said": "HI!HI!"}'
    assert registry.load_yaml(path) == ["shout"]  # reloading the same file replaces, no clash


def test_python_tool_whose_module_fails_to_import(tmp_path):
    module = python_module(tmp_path, "raise RuntimeError('boom at import')\n")
    message = load_error(tmp_path, f"tools:\n  - {{name: t, description: d, python: '{module}:f'}}\n")
    assert "'t': python" in message and "RuntimeError: boom at import" in message


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
        if query.get("ticker") == "FAIL":
            return self._send(500, "server exploded")
        self._send(200, json.dumps({"method": "GET", "query": query, "auth": self.headers.get("X-Key")}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, json.dumps({"method": "POST", "body": body}))

    def _send(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_tools_against_a_loopback_server(tmp_path, http_server):
    path = write(tmp_path, f"""tools:
  - name: price_get
    description: Latest price.
    parameters: {{type: object, properties: {{ticker: {{type: string}}}}, required: [ticker]}}
    http: {{url: "{http_server}/price", method: get, headers: {{X-Key: secret}}}}
    timeout: 5
  - name: price_post
    description: Latest price.
    parameters: {{type: object, properties: {{ticker: {{type: string}}, n: {{type: integer}}}}}}
    http: {{url: "{http_server}/price", method: POST}}
""")
    registry = ToolRegistry()
    registry.load_yaml(path)
    got = registry.dispatch("price_get", {"ticker": "ACME"})
    assert got.ok and json.loads(got.content) == {"method": "GET", "query": {"ticker": "ACME"}, "auth": "secret"}
    posted = registry.dispatch("price_post", {"ticker": "ACME", "n": 3})
    assert json.loads(posted.content) == {"method": "POST", "body": {"ticker": "ACME", "n": 3}}
    failed = registry.dispatch("price_get", {"ticker": "FAIL"})
    assert not failed.ok and "HTTP 500" in failed.content and "server exploded" in failed.content


def test_http_tool_when_the_server_is_down(tmp_path, http_server):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = ToolRegistry()
    registry.load_yaml(write(tmp_path, f"tools:\n  - {{name: down, description: d, "
                                       f"http: {{url: 'http://127.0.0.1:{port}/x'}}}}\n"))
    result = registry.dispatch("down", {})
    assert not result.ok and "HTTP request to" in result.content and "ConnectError" in result.content


def test_uploaded_text_is_loaded_under_its_own_name():
    registry = ToolRegistry()
    assert registry.load_yaml_text("tools:\n  - {name: up, description: d, manual: true}\n", "upload.yaml") == ["up"]
    with pytest.raises(ConfigError, match="^upload2.yaml: "):
        registry.load_yaml_text("tools:\n  - {name: up, description: d, manual: true}\n", "upload2.yaml")


def nested_aliases(levels: int) -> str:
    """A tools file whose aliases nest `levels` deep: 9**levels strings once expanded."""
    defs = ["          a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    defs += [f"          a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ("tools:\n  - name: laughs\n    description: d\n    manual: true\n    parameters:\n      type: object\n"
            "      properties:\n        x:\n          type: number\n" + "\n".join(defs) + "\n")


def test_alias_bombs_and_cycles_are_refused_before_anything_expands():
    registry = ToolRegistry()
    # a few aliases are fine: the schema is what it expands to
    assert registry.load_yaml_text(nested_aliases(3), "small.yaml") == ["laughs"]
    assert len(json.dumps(registry.get_tools())) > 9 ** 3
    # 9**12 strings (~30 TB of JSON in a prompt) would take the whole app down: refused at once
    with pytest.raises(ConfigError, match=r"^bomb.yaml: the file expands to more than 100,000 values"):
        ToolRegistry().load_yaml_text(nested_aliases(12), "bomb.yaml")
    with pytest.raises(ConfigError, match="contains it"):
        ToolRegistry().load_yaml_text("tools:\n  - &t {name: c, description: d, manual: true, loop: [*t]}\n",
                                      "cycle.yaml")
