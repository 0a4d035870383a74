"""Settings from flags and CHAT_* env, the agents catalogue, and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatserver.agents import AgentCatalog, AgentCatalogError
from chatserver.auth import Authenticator
from chatserver.cli import build_parser, main
from chatserver.settings import SPECS, Settings, SettingsError, defaults, env_name, load

SECRET = "cli-test-secret-with-enough-length-0123456789"


def test_no_settings_is_the_embedded_default() -> None:
    settings = load({}, {})
    assert settings.redis.url is None and settings.store.url is None
    assert settings.dev_auth
    assert (settings.replies.local_ttft_ms, settings.replies.local_token_ms) == (150, 15)
    assert settings.window.size == 200 and settings.ws.auth_timeout_s == 5.0


def test_flags_beat_env_and_env_beats_defaults() -> None:
    args = build_parser().parse_args(["serve", "--port", "9001", "--log-level", "debug"])
    settings = load(
        args, {"CHAT_PORT": "9002", "CHAT_WINDOW_SIZE": "300", "CHAT_JWT_SECRET": SECRET}
    )
    assert settings.server.port == 9001 and settings.server.log_level == "debug"
    assert settings.window.size == 300
    assert settings.auth.secret == SECRET and not settings.dev_auth
    with pytest.raises(AttributeError):
        settings.server.port = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHAT_PORT": "eighty"}, "CHAT_PORT='eighty'"),
        ({"CHAT_PORT": "70000"}, "CHAT_PORT=70000"),
        ({"CHAT_WINDOW_SIZE": "0"}, "CHAT_WINDOW_SIZE=0"),
        ({"CHAT_LOG_LEVEL": "loud"}, "CHAT_LOG_LEVEL='loud'"),
        ({"CHAT_REDIS_URL": "http://x"}, "CHAT_REDIS_URL"),
        ({"CHAT_DATABASE_URL": "mysql://x"}, "CHAT_DATABASE_URL"),
        ({"CHAT_JWT_SECRET": "short"}, "CHAT_JWT_SECRET"),
        ({"CHAT_AUTH_TIMEOUT_S": "soon"}, "CHAT_AUTH_TIMEOUT_S='soon'"),
        ({"CHAT_GEMINI_MODEL_LIMITS": "gemini-2.5-pro=20"}, "CONCURRENT/PER_MINUTE"),
        ({"CHAT_GEMINI_MODEL_LIMITS": "gemini-2.5-pro=-1/5"}, "CHAT_GEMINI_MODEL_LIMITS"),
        ({"CHAT_GEMINI_PROBE_MODEL": "models/../x"}, "CHAT_GEMINI_PROBE_MODEL"),
        ({"CHAT_GEMINI_RETRY_BUDGET_S": "-1"}, "CHAT_GEMINI_RETRY_BUDGET_S"),
        ({"CHAT_GEMINI_THINKING_TIMEOUT_S": "0"}, "CHAT_GEMINI_THINKING_TIMEOUT_S"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({}, env)
    assert named in str(info.value)


def test_public_dict_hides_secrets() -> None:
    settings = Settings.of(jwt_secret=SECRET, database_url="postgresql://u:hunter2@db/chat")
    public = settings.public_dict()
    assert public["jwt_secret"] == "***"
    assert "hunter2" not in public["database_url"]


def test_the_builtin_catalogue_covers_the_product_domains() -> None:
    catalog = AgentCatalog.load(None)
    ids = {a.id for a in catalog.public()}
    assert {"general", "health-coach", "finance-helper"} <= ids
    for agent in catalog:
        assert agent.system_prompt and agent.model and agent.light_model
        assert 0 <= agent.temperature <= 2 and agent.max_output_tokens > 0


def test_agents_file_overrides_the_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        '[[agents]]\nid = "tutor"\nname = "Tutor"\ndescription = "Teaches"\n'
        'model = "gemini-2.5-flash"\nsystem_prompt = "Teach."\npublic = false\ncacheable = true\n'
    )
    catalog = AgentCatalog.load(str(path))
    tutor = catalog.get("tutor")
    assert tutor is not None and tutor.cacheable and not tutor.public
    assert catalog.get("general") is None and catalog.public() == []


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not toml [", "agents.toml"),
        ("[[agents]]\nid = 'a'\n", "'name'"),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nmodel="m"\nsystem_prompt="s"\ncolour=1\n',
            "unknown keys",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nmodel="m"\nsystem_prompt="s"\n'
            "temperature=9\n",
            "temperature",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nmodel="m"\nsystem_prompt="s"\n'
            'public="yes"\n',
            "public",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nsystem_prompt="s"\n'
            'model="gemini-2.5-pro"\nmax_output_tokens=1024\nthinking_budget=1024\n',
            "leaves no room for the answer",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nsystem_prompt="s"\n'
            'model="gemini-2.5-pro"\nthinking_budget=-2\n',
            "thinking_budget",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nsystem_prompt="s"\n'
            'model="gemini-2.5-pro"\nthinking_budget=true\n',
            "thinking_budget",
        ),
        (
            '[[agents]]\nid="a"\nname="A"\ndescription="d"\nsystem_prompt="s"\n'
            'model="models/gemini 2.5"\n',
            "'model' must be a model id",
        ),
        ("", "[[agents]]"),
    ],
)
def test_bad_agent_files_say_what_is_wrong(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    with pytest.raises(AgentCatalogError) as info:
        AgentCatalog.load(str(path))
    assert named in str(info.value)


def test_an_agent_names_its_model_in_either_form_and_may_bound_its_thinking(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        '[[agents]]\nid = "pro"\nname = "Pro"\ndescription = "d"\nsystem_prompt = "s"\n'
        'model = "models/gemini-2.5-pro"\nlight_model = "tunedModels/support-7"\n'
        "max_output_tokens = 4096\nthinking_budget = -1\n"
        '[[agents]]\nid = "flash"\nname = "Flash"\ndescription = "d"\nsystem_prompt = "s"\n'
        'model = "gemini-2.5-flash"\n'
    )
    catalog = AgentCatalog.load(str(path))
    pro, flash = catalog.get("pro"), catalog.get("flash")
    assert pro is not None and pro.thinking_budget == -1 and pro.model == "models/gemini-2.5-pro"
    assert flash is not None and flash.thinking_budget is None  # absent: not sent


def test_the_builtin_agents_leave_room_for_the_answer() -> None:
    for agent in AgentCatalog.load(None):
        assert agent.thinking_budget is not None, f"{agent.id}: Gemini 2.5 would think freely"
        if agent.thinking_budget > 0:
            assert agent.max_output_tokens - agent.thinking_budget >= 1024, agent.id
        if "pro" in agent.model:
            assert agent.thinking_budget != 0, f"{agent.id}: 2.5 Pro cannot turn thinking off"


def test_missing_agents_file() -> None:
    with pytest.raises(AgentCatalogError, match="No such file"):
        AgentCatalog.load("/nonexistent/agents.toml")


def test_token_command_signs_with_the_configured_secret() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatserver",
            "token",
            "--user",
            "alice",
            "--tier",
            "pro",
            "--ttl",
            "60",
        ],
        env={"CHAT_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    principal = Authenticator(SECRET).verify(done.stdout.strip())
    assert (principal.user_id, principal.tier) == ("alice", "pro")


def test_token_command_needs_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CHAT_JWT_SECRET", raising=False)
    assert main(["token", "--user", "alice"]) == 2
    assert "CHAT_JWT_SECRET" in capsys.readouterr().err


def test_serve_refuses_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHAT_PORT", "eighty")
    assert main(["serve"]) == 2
    assert "CHAT_PORT='eighty'" in capsys.readouterr().err


def test_the_access_log_never_shows_a_query_token(caplog: pytest.LogCaptureFixture) -> None:
    """A token given as ?token= on /ws must not reach the logs."""
    import logging

    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web import Response

    from chatserver.ops.logs import JsonAccessLogger

    logger = logging.getLogger("aiohttp.access")
    request = make_mocked_request("GET", "/ws?token=secret.jwt.value")
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        JsonAccessLogger(logger, "").log(request, Response(status=101), 0.002)
    assert "secret.jwt.value" not in caplog.text
    record = caplog.records[-1]
    assert record.path == "/ws" and record.status == 101  # type: ignore[attr-defined]


def test_the_readme_lists_every_flag_with_its_default() -> None:
    """The README's tables are the user's reference: they follow ``defaults()``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = re.findall(r"^\| `--([a-z0-9-]+)` \| `(CHAT_[A-Z0-9_]+)` \| ([^|]+) \|", readme, re.M)
    listed = {flag.replace("-", "_"): (env, default.strip()) for flag, env, default in rows}
    flags = {name for name, spec in SPECS.items() if spec.flag}
    assert set(listed) == flags
    for name, (env, default) in listed.items():
        assert env == env_name(name)
        value = defaults()[name]
        if isinstance(value, bool):
            assert default == ("yes" if value else "no"), name
        elif value is None:
            assert default == "unset", name
        elif default.startswith("`") and name != "server_id":
            assert default == f"`{value}`", name
