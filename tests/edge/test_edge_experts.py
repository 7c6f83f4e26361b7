"""The experts file: minimal entries, every malformed one named in one line (CLI: exit 2)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gatelab.cli import app
from gatelab.edge.experts import load_experts

ASK = ["edge", "ask", "q?", "--option", "a", "--option", "b", "--option", "c", "--option", "d"]


def _write(tmp_path, text):
    path = tmp_path / "experts.yaml"
    path.write_text(text)
    return path


def test_name_base_url_device_suffice(tmp_path):
    path = _write(
        tmp_path,
        "- {name: a, base_url: 'http://127.0.0.1:8000', device: cpu}\n"
        "- name: b\n  base_url: http://127.0.0.1:8081\n"
        "  device: {flops_per_s: 1.0e12, power_w: 10, network_s: 0.01}  # PyYAML: a string\n"
        "- {name: c, base_url: 'https://h.example', device: rtx-4090, backend: llamacpp}\n",
    )
    a, b, c = load_experts(path, timeout_s=5.0)
    assert (a.backend, a.method, a.timeout_s) == ("auto", "continuation", 5.0)
    assert b.device_profile.power_w == 10 and b.device_profile.flops_per_s == 1e12
    assert c.backend == "llamacpp"


A = "- {name: a, base_url: 'http://h', "  # the start of an entry
CUSTOM = A + "device: {flops_per_s: %s, power_w: 1, network_s: 0}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- {name: a, base_url: x\n", r"experts.yaml:2: not valid YAML \(.*\)$"),
        ("- [unclosed\n", r"experts.yaml:2: not valid YAML"),
        ("name: a\n", "expected a non-empty YAML list of experts"),
        ("", "expected a non-empty YAML list"),
        ("- {name: a, device: cpu}\n", "expert 1 needs name, base_url and device"),
        (A + "device: cpu, colour: red}\n", r"unknown keys \['colour'\]"),
        (A + "device: cpu, timeout_s: soon}\n", "expert a: timeout_s must be a number, got 'soon'"),
        (A + "device: cpu, max_retries: true}\n", "max_retries must be a int"),
        (A + "device: cpu, timeout_s: .nan}\n", "need timeout_s > 0"),
        ("- {name: 3, base_url: 'http://h', device: cpu}\n", "expert 3: name must be a str"),
        (A + "device: [cpu]}\n", "expert a: device must be a str or mapping"),
        (A + "device: gpu9}\n", "expert a: unknown device 'gpu9'"),
        (A + "device: {power_w: 1}}\n", "a device mapping needs exactly"),
        (CUSTOM % "x", "device flops_per_s must be a number"),
        (CUSTOM % "0", "need flops_per_s > 0"),
        (A + "device: cpu, backend: ollama}\n", "EdgeExpert a: backend must be one of"),
        ("- {name: a, base_url: 'h:80', device: cpu}\n", "EdgeExpert a: base_url must be http"),
        (A + "device: cpu}\n" + A + "device: cpu}\n", "two experts are named 'a'"),
    ],
)
def test_malformed_files_are_one_line_naming_the_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as error:
        load_experts(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_cli_exits_2_with_one_line(tmp_path):
    runner = CliRunner()
    broken = _write(tmp_path, "- {name: a, base_url: x\n")
    for command in (["edge", "collect", "--quick"], ASK):
        result = runner.invoke(app, [*command, "--experts", str(broken)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "not valid YAML" in result.output
        assert len(result.output.strip().splitlines()) == 1
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    result = runner.invoke(app, [*ASK, "--experts", str(binary)])
    assert result.exit_code == 2 and "not a text file" in result.output


def test_cli_allow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "t")
    path = _write(
        tmp_path,
        "- {name: a, base_url: 'http://127.0.0.1:1', device: cpu, api_key_env: MY_TOKEN}\n",
    )
    runner = CliRunner()
    refused = runner.invoke(app, [*ASK, "--experts", str(path), "--run-dir", str(tmp_path)])
    assert refused.exit_code == 2 and "--allow-env MY_TOKEN" in refused.output
    # allowed: it gets as far as the missing sweep folder
    allowed = runner.invoke(
        app, [*ASK, "--experts", str(path), "--allow-env", "MY_TOKEN", "--run-dir", str(tmp_path)]
    )
    assert allowed.exit_code == 2 and "gate.safetensors" in allowed.output
    remote = _write(
        tmp_path, "- {name: a, base_url: 'http://192.0.2.1', device: cpu, api_key_env: GATELAB_K}\n"
    )
    result = runner.invoke(app, [*ASK, "--experts", str(remote), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "EdgeExpert a: refusing to send the key" in result.output


def test_shipped_examples_hold_only_name_base_url_device():
    root = Path(__file__).parents[2] / "examples" / "edge"
    (llama,) = load_experts(root / "llama.yaml")
    gatelab, llama_too = load_experts(root / "mixed.yaml")
    for expert in (llama, gatelab, llama_too):
        assert expert.backend == "auto" and expert.api_key_env is None
    assert llama.base_url == llama_too.base_url != gatelab.base_url
