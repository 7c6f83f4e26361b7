"""Where the experts are: the demo pool and the ``experts.yaml`` file, read here only.

``experts.yaml`` is a YAML list of ``{name, base_url, device, model?, api?, method?, normalize?,
timeout_s?, max_retries?, backoff_s?, top_logprobs?, flops_per_token?, api_key_env?}``; a key is
read only from the environment variable that ``api_key_env`` names, never from the file.
"""

from __future__ import annotations

from pathlib import Path

from gatelab.edge.client import EdgeExpert
from gatelab.edge.costs import PROFILES, DeviceProfile

# The demo pool: (expert/model name, device profile). Two model families: SmolLM2-135M-Instruct
# with five behaviours, and the Gemma 3 270M base model (zero-shot; ``gemma3-270m-fewshot`` is
# stronger but costs 2.5x the compute to collect, too slow for the shared CPUs here).
DEFAULT_POOL = (
    ("smollm2-135m", "jetson-agx-orin"),
    ("smollm2-135m-fewshot", "rtx-4090"),
    ("smollm2-135m-chat", "jetson-agx-orin"),
    ("smollm2-135m-l20-fewshot", "jetson-agx-orin"),
    ("smollm2-135m-l16-fewshot", "cpu"),
    ("gemma3-270m", "jetson-agx-orin"),
)


def load_experts(path: str | Path, timeout_s: float | None = None) -> list[EdgeExpert]:
    """Experts from a YAML list of ``{name, base_url, device, model?, api?, timeout_s?, ...}``.

    ``device`` is a profile name (``jetson-agx-orin``, ``rtx-4090``, ``cpu``) or a mapping with
    ``flops_per_s``, ``power_w``, ``network_s``. Keys: never in the file; give ``api_key_env``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed entries.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experts file not found: {path}")
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty YAML list of experts")
    allowed = {"name", "base_url", "device", "model", "api", "timeout_s", "max_retries"}
    allowed |= {"backoff_s", "top_logprobs", "flops_per_token", "api_key_env", "method"}
    allowed |= {"normalize"}
    experts = []
    for entry in entries:
        if not isinstance(entry, dict) or not {"name", "base_url", "device"} <= set(entry):
            raise ValueError(f"{path}: each expert needs name, base_url and device, got {entry!r}")
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} for expert {entry['name']}")
        device = entry.pop("device")
        if isinstance(device, dict):
            profile = DeviceProfile(
                name=device.get("name", "custom"),
                **{k: float(v) for k, v in device.items() if k != "name"},
            )
        elif device in PROFILES:
            profile = PROFILES[device]
        else:
            raise ValueError(f"{path}: unknown device {device!r}; choose from {sorted(PROFILES)}")
        if timeout_s is not None:
            entry["timeout_s"] = timeout_s
        experts.append(EdgeExpert(device_profile=profile, **entry))
    return experts


def experts_for(
    path: str | Path | None, timeout_s: float | None = None, url: str = "http://127.0.0.1:8000"
) -> list[EdgeExpert]:
    """The experts of ``path``, or without a file the demo pool served at ``url``."""
    if path is not None:
        return load_experts(path, timeout_s)
    kwargs = {} if timeout_s is None else {"timeout_s": timeout_s}
    return [EdgeExpert(n, url, PROFILES[p], **kwargs) for n, p in DEFAULT_POOL]
