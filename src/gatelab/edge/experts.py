"""Where the experts are: the demo pool and the ``experts.yaml`` file, read here only.

``experts.yaml`` is a YAML list of ``{name, base_url, device, backend?, model?, api?, method?,
normalize?, timeout_s?, max_retries?, backoff_s?, top_logprobs?, flops_per_token?,
api_key_env?}`` (see :class:`~gatelab.edge.client.EdgeExpert`); ``name``, ``base_url`` and
``device`` suffice for gatelab's, llama.cpp's and vLLM's servers (``backend`` defaults to
``auto``). A key is read only from the environment variable that ``api_key_env`` names, never from
the file, and only a ``GATELAB_*`` variable or one the user allows (``allow_env``, the CLI's
``--allow-env NAME``).
"""

from __future__ import annotations

from collections.abc import Iterable
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

_NUMBER = (int, float)
FIELDS: dict[str, tuple[type, ...]] = {  # experts.yaml key -> accepted YAML types
    "name": (str,),
    "base_url": (str,),
    "device": (str, dict),
    "backend": (str,),
    "model": (str,),
    "api": (str,),
    "method": (str,),
    "normalize": (str,),
    "timeout_s": _NUMBER,
    "max_retries": (int,),
    "backoff_s": _NUMBER,
    "top_logprobs": (int,),
    "flops_per_token": _NUMBER,
    "api_key_env": (str,),
}
DEVICE_FIELDS = ("flops_per_s", "power_w", "network_s")


def _yaml_error(path: Path, error: Exception) -> ValueError:
    """One line naming the file, the line and the problem of a YAML syntax error."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return ValueError(f"{where}: not valid YAML ({problem})")


def _number(value: object) -> float | None:
    """A YAML number as float; also a numeric string (PyYAML reads ``5e12`` as one)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _device(path: Path, name: str, device: str | dict) -> DeviceProfile:
    if isinstance(device, str):
        if device not in PROFILES:
            raise ValueError(
                f"{path}: expert {name}: unknown device {device!r}; choose from {sorted(PROFILES)}"
            )
        return PROFILES[device]
    keys = set(device) - {"name"}
    if keys != set(DEVICE_FIELDS):
        raise ValueError(
            f"{path}: expert {name}: a device mapping needs exactly {list(DEVICE_FIELDS)} "
            f"(and an optional name), got {sorted(device)}"
        )
    values = {}
    for key in DEVICE_FIELDS:
        values[key] = _number(device[key])
        if values[key] is None:
            raise ValueError(
                f"{path}: expert {name}: device {key} must be a number, got {device[key]!r}"
            )
    try:
        return DeviceProfile(name=str(device.get("name", "custom")), **values)
    except ValueError as error:
        raise ValueError(f"{path}: expert {name}: {error}") from None


def load_experts(
    path: str | Path, timeout_s: float | None = None, allow_env: Iterable[str] = ()
) -> list[EdgeExpert]:
    """Experts from a YAML list of ``{name, base_url, device, backend?, model?, ...}``.

    ``device`` is a profile name (``jetson-agx-orin``, ``rtx-4090``, ``cpu``) or a mapping with
    ``flops_per_s``, ``power_w``, ``network_s``. Keys: never in the file; give ``api_key_env``.

    Args:
        path: the experts file.
        timeout_s: overrides every expert's ``timeout_s``.
        allow_env: environment variables ``api_key_env`` may name besides ``GATELAB_*``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, or a malformed entry (one line naming the file and the expert).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experts file not found: {path}")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise _yaml_error(path, error) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty YAML list of experts")
    experts, seen = [], set()
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not {"name", "base_url", "device"} <= set(entry):
            raise ValueError(
                f"{path}: expert {number} needs name, base_url and device, got {entry!r}"
            )
        name = entry["name"]
        unknown = set(entry) - set(FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)} for expert {name}")
        for key, value in entry.items():
            if FIELDS[key] == _NUMBER and _number(value) is not None:
                entry[key] = _number(value)
            elif isinstance(value, bool) or not isinstance(value, FIELDS[key]):
                kinds = "number" if FIELDS[key] == _NUMBER else FIELDS[key][0].__name__
                kinds = "str or mapping" if key == "device" else kinds
                raise ValueError(f"{path}: expert {name}: {key} must be a {kinds}, got {value!r}")
        if name in seen:
            raise ValueError(f"{path}: two experts are named {name!r}")
        seen.add(name)
        kwargs = {k: v for k, v in entry.items() if k != "device"}
        if timeout_s is not None:
            kwargs["timeout_s"] = timeout_s
        profile = _device(path, name, entry["device"])
        try:
            experts.append(EdgeExpert(device_profile=profile, allow_env=tuple(allow_env), **kwargs))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return experts


def experts_for(
    path: str | Path | None,
    timeout_s: float | None = None,
    url: str = "http://127.0.0.1:8000",
    allow_env: Iterable[str] = (),
) -> list[EdgeExpert]:
    """The experts of ``path``, or without a file the demo pool served at ``url``."""
    if path is not None:
        return load_experts(path, timeout_s, allow_env)
    kwargs = {} if timeout_s is None else {"timeout_s": timeout_s}
    return [EdgeExpert(n, url, PROFILES[p], **kwargs) for n, p in DEFAULT_POOL]
