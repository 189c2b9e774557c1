"""Configuration precedence of the real binary: defaults < config file < environment < flags."""

import subprocess
import tomllib

from conftest import SERVER_BIN


def effective(tmp_path, file_text, env=None, flags=()):
    config = tmp_path / "polyhead.toml"
    config.write_text(file_text)
    result = subprocess.run(
        [str(SERVER_BIN), "--config", str(config), *flags, "--print-config"],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


def test_each_source_overrides_the_one_before(tmp_path):
    text = "max-frames = 12\nmax-top-k = 7\nqueue-capacity = 9\n"
    config = effective(
        tmp_path,
        text,
        env={"POLYHEAD_MAX_TOP_K": "8", "POLYHEAD_QUEUE_CAPACITY": "10"},
        flags=["--queue-capacity", "11"],
    )
    assert config["max-frames"] == 12, "file over default"
    assert config["max-top-k"] == 8, "environment over file"
    assert config["queue-capacity"] == 11, "flag over environment"
    assert config["max-clip-side"] == 4096, "default when nothing sets it"


def test_invalid_configuration_is_refused_with_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("max-framez = 3\n")
    result = subprocess.run(
        [str(SERVER_BIN), "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "max-framez" in result.stderr
