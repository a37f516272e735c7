"""MCP servers in the tools YAML: validation, real reference servers (mcp-server-time, mcp-server-git)
through dispatch_tool, failures from our own test server, and no process left behind."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import tools
from chatglm_core.errors import ConfigError
from tools import mcp_client, mcp_tools
from tools.builtins import register_builtins
from tools.registry import ToolRegistry

TEST_SERVER = str(Path(__file__).with_name("mcp_test_server.py"))


def children() -> set[int]:
    """Our live descendants (zombies are dead: their parent just hasn't reaped them)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pid: int, settle: float = 3.0) -> bool:
    """Whether `pid` still runs `settle` seconds from now at the latest (a kill lands asynchronously)."""
    deadline = time.monotonic() + settle
    while True:
        try:
            running = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            running = False
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaks():
    before = children()
    yield
    gc.collect()
    assert not any(alive(p) for p in children() - before), "an MCP server process outlived its test"


@pytest.fixture
def registry():
    reg = ToolRegistry(timeout=10)
    register_builtins(reg)
    yield reg
    reg.close_mcp()


def load(registry: ToolRegistry, body: str, source: str = "servers.yaml") -> list[str]:
    return registry.load_yaml_text(textwrap.dedent(body), source)


# --- validation: one error naming file, server and field; nothing started -------------------
@pytest.mark.parametrize("entry, expected", [
    ("{name: s}", "mcp server 's': command/url: give exactly one of command"),
    ("{name: s, command: [x], url: 'http://a/mcp'}", "mcp server 's': command/url: give exactly one of command"),
    ("{name: s, url: 'http://a/mcp', env: {A: b}}", "mcp server 's': env: is for command"),
    ("{name: s, command: [x], headers: {A: b}}", "mcp server 's': headers: are for url"),
    ("{name: s, url: 'ftp://a'}", "mcp server 's': url: must start with http"),
    ("{name: 'has space', command: [x]}", "mcp server 'has space': name: String should match"),
    ("{name: s, command: []}", "mcp server 's': command: List should have at least 1 item"),
    ("{name: s, command: [x], timeout: 0}", "mcp server 's': timeout: Input should be greater than 0"),
    ("{name: s, command: [x], colour: red}", "mcp server 's': colour: unknown key (allowed: name, command"),
    ("{command: [x]}", "mcp server '#1': name: missing required field"),
    ("just text", "mcp server '#1': each server must be a mapping"),
])
def test_bad_entries_give_one_error_naming_file_server_and_field(registry, entry, expected):
    before = set(registry.names())
    with pytest.raises(ConfigError) as err:
        load(registry, f"tools:\n  - {{name: t1, description: d, manual: true}}\nmcp:\n  - {entry}\n", "my.yaml")
    assert str(err.value).startswith("my.yaml: ") and expected in str(err.value)
    assert set(registry.names()) == before  # all or none: the file's tool was not registered either


def test_two_servers_with_one_name_and_a_wrong_shape(registry):
    with pytest.raises(ConfigError, match="mcp server 'a': name: defined twice"):
        load(registry, "mcp:\n  - {name: a, command: [x]}\n  - {name: a, url: 'http://h/mcp'}\n")
    with pytest.raises(ConfigError, match="top-level keys must be tools"):
        load(registry, "mcp: {name: a, command: [x]}\n")


# --- real reference servers ---------------------------------------------------------------
TIME = "mcp:\n  - name: time\n    command: [python, -m, mcp_server_time, --local-timezone, UTC]\n"


def test_mcp_server_time_through_dispatch_tool_and_get_tools(tmp_path, small_settings):
    path = tmp_path / "time.yaml"
    path.write_text(TIME)
    saved = tools._default
    try:
        tools.configure(small_settings.model_copy(update={"tools": str(path)}))
        specs = {s["function"]["name"]: s["function"] for s in tools.get_tools()}
        # get_current_time is a built-in too: the server's copy gets the server's name as a prefix
        assert "time_get_current_time" in specs and "convert_time" in specs and "get_current_time" in specs
        assert specs["convert_time"]["parameters"]["required"] == ["source_timezone", "time", "target_timezone"]
        result = tools.dispatch_tool("convert_time", {"source_timezone": "Europe/London", "time": "12:00",
                                                      "target_timezone": "Asia/Tokyo"})
        assert result.ok and "21:00" in result.content and "Asia/Tokyo" in result.content
        now = tools.dispatch_tool("time_get_current_time", {"timezone": "Asia/Kolkata"})
        assert now.ok and "+05:30" in now.content
        bad = tools.dispatch_tool("time_get_current_time", {"timezone": "Mars/Olympus"})
        assert not bad.ok and "Mars/Olympus" in bad.content  # the server's own error, as an error result
        missing = tools.dispatch_tool("convert_time", {"time": "12:00"})  # checked against its schema first
        assert not missing.ok and "source_timezone" in missing.content
        assert tools.default_registry().get("convert_time").source == f"{path} · mcp server 'time'"
    finally:
        tools.default_registry().close_mcp()
        tools._default = saved


def test_mcp_server_git_with_an_allow_list(registry, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("hello\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first commit of the test"], check=True)
    (repo / "b.txt").write_text("new\n")
    names = load(registry, f"mcp:\n  - name: git\n    command: [python, -m, mcp_server_git, --repository, '{repo}']\n"
                           "    tools: [git_log, git_status]\n")
    assert sorted(names) == ["git_log", "git_status"] and "git_diff" not in registry
    log = registry.dispatch("git_log", {"repo_path": str(repo)})
    assert log.ok and "first commit of the test" in log.content
    status = registry.dispatch("git_status", {"repo_path": str(repo)})
    assert status.ok and "b.txt" in status.content
    assert registry.dispatch("calculator", {"expression": "2+2"}).content == "4"  # built-ins unaffected


# --- failures, from our own test server -------------------------------------------------------
def server(name: str, *flags: str, timeout: float = 20) -> str:
    args = ", ".join([TEST_SERVER, *flags])
    return f"  - {{name: {name}, command: [python, {args}], timeout: {timeout}}}\n"


def test_a_stdio_server_gets_only_its_env_and_path(registry, monkeypatch):
    monkeypatch.setenv("CHATGLM_API_KEY", "secret-of-the-app")
    load(registry, f"mcp:\n  - {{name: t, command: [python, {TEST_SERVER}], env: {{GREETING: hi}}}}\n")
    names = set(registry.dispatch("environ", {}).content.split())
    assert {"PATH", "GREETING"} <= names and "CHATGLM_API_KEY" not in names and "HOME" not in names
    assert names - {"PATH", "GREETING"} <= {"LC_CTYPE"}  # at most what the interpreter sets itself


def test_results_with_images_errors_and_several_contents(registry):
    load(registry, "mcp:\n" + server("t"))
    picture = registry.dispatch("picture", {})
    assert picture.ok and picture.content == "a red dot\n[Image 1: image/png]\na note"
    assert len(picture.images) == 1 and picture.images[0].startswith(b"\x89PNG")
    failed = registry.dispatch("fail", {})
    assert not failed.ok and failed.content == "Error: the widget is broken"


def test_servers_that_fail_to_start_are_warnings_and_the_rest_loads(registry, monkeypatch):
    monkeypatch.setattr(mcp_tools, "START_TIMEOUT", 4.0)
    names = load(registry, "tools:\n  - {name: note, description: d, manual: true}\nmcp:\n"
                 + server("good", timeout=30)
                 + server("crash", "--crash-at-start") + server("slow", "--hang-at-start", timeout=1)
                 + "  - {name: gone, command: [no-such-program-q7]}\n"
                 + "  - {name: web, url: 'http://127.0.0.1:9/mcp', timeout: 5}\n")
    assert "note" in names and "echo" in names
    warnings = "\n".join(registry.warnings)
    assert "servers.yaml: MCP server 'crash' failed to start" in warnings
    assert "test server: missing configuration, giving up" in warnings  # its stderr, to say why
    assert "servers.yaml: MCP server 'slow' did not start within 4 s" in warnings
    assert "servers.yaml: MCP server 'gone': command 'no-such-program-q7' was not found" in warnings
    assert "servers.yaml: MCP server 'web' failed to start: ConnectError" in warnings
    assert registry.dispatch("echo", {"text": "hi"}).content == "hi"
    assert len(mcp_client.running()) == 1


def test_a_malformed_result_is_an_error_result(registry):
    load(registry, "mcp:\n" + server("t"))
    garbage = registry.dispatch("garbage", {})
    assert not garbage.ok
    assert garbage.content.startswith("Error: MCP server 't' answered 'garbage' with a malformed result")
    assert registry.dispatch("echo", {"text": "fine"}).content == "fine"


def test_a_bad_schema_skips_that_tool_only(registry):
    names = load(registry, "mcp:\n" + server("t", "--bad-schema"))
    assert "echo" in names and "broken" not in registry
    assert any("mcp server 't': skipped tool 'broken': parameters is not a valid JSON Schema" in w
               for w in registry.warnings)


def test_a_hung_call_ends_at_its_timeout_and_the_server_keeps_working(registry):
    load(registry, "mcp:\n" + server("t", timeout=2))
    start = time.monotonic()
    hung = registry.dispatch("hang", {"seconds": 60})
    assert not hung.ok and hung.content == "Error: MCP server 't' did not answer 'hang' within 2 s"
    assert time.monotonic() - start < 10
    assert registry.dispatch("echo", {"text": "still here"}).content == "still here"


def test_a_server_that_dies_gives_error_results_and_others_keep_working(registry):
    load(registry, "mcp:\n" + server("t") + server("u"), "two.yaml")  # u's tools all clash: u_echo, ...
    assert "u_echo" in registry
    died = registry.dispatch("die", {})
    assert not died.ok and died.content.startswith("Error: MCP server 't' failed on 'die'")
    after = registry.dispatch("echo", {"text": "x"})
    assert not after.ok and "MCP server 't'" in after.content
    assert registry.dispatch("u_echo", {"text": "other server"}).content == "other server"
    assert registry.dispatch("calculator", {"expression": "6*7"}).content == "42"


def test_a_clash_that_remains_with_the_prefix_is_a_warning_naming_it(registry):
    load(registry, "tools:\n  - {name: echo, description: d, manual: true}\n"
                   "  - {name: t_echo, description: d, manual: true}\nmcp:\n" + server("t"))
    assert registry.get("echo").manual and "picture" in registry
    assert any("mcp server 't': tool 'echo': the name is taken and so is 't_echo'" in w for w in registry.warnings)


# --- lifecycle: reload, close, garbage collection, exit ------------------------------------------
def test_reloading_a_file_stops_its_old_servers(registry):
    load(registry, "mcp:\n" + server("t"))
    first = {c.pid for c in mcp_client.running()}
    load(registry, "mcp:\n" + server("t"))
    second = {c.pid for c in mcp_client.running()}
    assert len(first) == len(second) == 1 and first != second
    assert not any(alive(p) for p in first)
    load(registry, "tools: []\n")
    assert mcp_client.running() == [] and "echo" not in registry


def test_closing_kills_what_the_server_started(registry):
    load(registry, "mcp:\n" + server("t"))
    grandchild = int(registry.dispatch("spawn", {}).content)
    assert alive(grandchild, settle=0)
    registry.close_mcp()
    assert not alive(grandchild) and "echo" not in registry


def test_a_dropped_registry_stops_its_servers():
    reg = ToolRegistry()
    load(reg, "mcp:\n" + server("t"))
    pid = mcp_client.running()[0].pid
    copy = reg.copy()  # a copy shares the tools but owns no server
    del copy
    gc.collect()
    assert alive(pid, settle=0)
    del reg
    gc.collect()
    assert not alive(pid)


def test_servers_stop_when_the_process_exits(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from tools.registry import ToolRegistry
        from tools import mcp_client
        reg = ToolRegistry()
        reg.load_yaml_text("mcp:\\n  - {{name: t, command: [python, {TEST_SERVER}]}}\\n", "x.yaml")
        print(mcp_client.running()[0].pid, flush=True)
        sys.exit(0)  # no close: atexit must do it
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 0, out.stderr
    assert not alive(int(out.stdout.split()[0]))


# --- the agent loop with the real model -----------------------------------------------------------
def test_the_agent_loop_calls_a_real_mcp_server_with_the_real_model(registry, small_engine):
    """A forced call is decoded under the tool's JSON Schema (constrained), so the small model's call
    is valid; the real mcp-server-time answers it and the model gets the observation."""
    from chatglm_core.agent import run_agent
    from chatglm_core.backends.base import GenerationOptions
    from chatglm_core.messages import Done, Message, Role, ToolCallEvent, ToolResultEvent

    load(registry, TIME)
    events = list(run_agent(small_engine, [Message(Role.USER, "What time is it now in Asia/Tokyo?")],
                            registry=registry, options=GenerationOptions(max_new_tokens=40, temperature=0),
                            tool_choice={"name": "time_get_current_time"}, max_rounds=1))
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert [c.name for c in calls] == ["time_get_current_time"] and calls[0].arguments == {"timezone": "Asia/Tokyo"}
    assert results[0].ok and '"timezone": "Asia/Tokyo"' in results[0].message.content
    assert "+09:00" in results[0].message.content
    assert isinstance(events[-1], Done)
