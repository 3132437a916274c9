"""What ``python app.py`` can be told: flags and environment variables, the same names
(docs/api.md §16).

Common settings apply to every method; each registered method adds ``--<method>-checkpoint``
(``<METHOD>_CHECKPOINT``) and one flag per option its spec offers the app
(``--<method>-<option>``, ``<METHOD>_<OPTION>``). A flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from detector import limits
from detector.base import set_arguments
from detector.checkpoint_sets import OFFICIAL, resolve_set
from detector.errors import CheckpointError
from detector.registry import get_method, get_spec, list_methods
from detector.runtime import RUNTIME_VARIABLE, RUNTIMES
from detector.service import ServiceConfig


@dataclass(frozen=True)
class AppConfig:
    """The app's settings.

    Attributes:
        backbone, backbone_weights: for every method (``None`` = each method's official ones).
        checkpoints: per method name, a checkpoint path or ``hf-hub:`` address.
        method_options: per method name, default options (e.g. a preset).
        device, threads: torch device and CPU threads (OpenVINO uses torch's count).
        runtime: what runs every method's frozen image path (``detector.runtime``):
            ``"auto"``, ``"openvino"`` or ``"torch"``; ``None`` = the methods' default
            (``DETECTOR_RUNTIME`` when set, else ``"auto"``).
        server_name, server_port: where Gradio listens.
        examples: offer the example sets.
        warm_start: build the models in the background right after start-up.
    """

    backbone: str | None = None
    backbone_weights: str | None = None
    checkpoints: Mapping[str, str] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    threads: int | None = None
    runtime: str | None = None
    server_name: str | None = None
    server_port: int | None = None
    examples: bool = True
    warm_start: bool = False

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            backbone=self.backbone or None,
            backbone_weights=self.backbone_weights or None,
            checkpoints=with_official_defaults(self.checkpoints, self.backbone),
            method_options={
                method: {**({"runtime": self.runtime} if self.runtime else {}), **dict(self.method_options.get(method, {}))}
                for method in dict.fromkeys([*list_methods(), *self.method_options])
            },
            device=self.device,
        )


def with_official_defaults(checkpoints: Mapping[str, str], backbone: str | None) -> dict[str, str]:
    """The configured checkpoints, plus ``"official"`` for each method trained offline that
    has none configured while the local weights cache holds its set (``weights fetch``);
    only on the official backbones (a cached set does not fit another one)."""
    chosen = {k: v for k, v in checkpoints.items() if v}
    if backbone:
        return chosen
    for method in list_methods():
        cls = get_method(method)
        if method in chosen or not cls.spec.trained_offline or cls.artefacts() is None:
            continue
        try:
            resolve_set(OFFICIAL, **set_arguments(cls))
        except CheckpointError:
            continue
        chosen[method] = OFFICIAL
    return chosen


@dataclass(frozen=True)
class ConfigFlag:
    """One setting: its flag, the environment variables that may set it (the first one set
    wins), its type, help, and where the value goes (``store(values, value)``)."""

    flag: str
    variables: tuple[str, ...]
    kind: Callable[[str], Any]
    help: str
    store: Callable[[dict[str, Any], Any], None]


def _field(name: str) -> Callable[[dict[str, Any], Any], None]:
    def store(values: dict[str, Any], value: Any) -> None:
        values[name] = value

    return store


def _checkpoint(method: str) -> Callable[[dict[str, Any], Any], None]:
    def store(values: dict[str, Any], value: Any) -> None:
        values.setdefault("checkpoints", {})[method] = value

    return store


def _method_option(method: str, option: str) -> Callable[[dict[str, Any], Any], None]:
    def store(values: dict[str, Any], value: Any) -> None:
        values.setdefault("method_options", {}).setdefault(method, {})[option] = value

    return store


def _checked(kind: type, choices: Sequence[Any], flag: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if choices and value not in choices:
            raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}")
        return value

    convert.__name__ = kind.__name__
    return convert


COMMON_FLAGS: tuple[ConfigFlag, ...] = (
    ConfigFlag("--backbone", ("DETECTOR_BACKBONE",), str, "open_clip model for every method (default: each method's official one; 'tiny-test' = small random CLIP)", _field("backbone")),
    ConfigFlag("--backbone-weights", ("DETECTOR_BACKBONE_WEIGHTS",), str, "pretrained tag, local file, 'hf-hub:...' or 'random' for every method (default: official weights)", _field("backbone_weights")),
    ConfigFlag("--device", ("DETECTOR_DEVICE",), str, "torch device (default: cpu)", _field("device")),
    ConfigFlag("--threads", ("DETECTOR_THREADS",), int, "torch CPU threads, OpenVINO's too (default: torch's choice)", _field("threads")),
    ConfigFlag(
        "--runtime",
        (RUNTIME_VARIABLE,),
        _checked(str, RUNTIMES, "--runtime"),
        "what runs the frozen image encoders: auto (OpenVINO on the CPU when its conversion succeeds, else PyTorch), openvino or torch (default: auto)",
        _field("runtime"),
    ),
    ConfigFlag("--server-name", ("GRADIO_SERVER_NAME",), str, "host to listen on (default 127.0.0.1; 0.0.0.0 on Spaces)", _field("server_name")),
    ConfigFlag("--server-port", ("GRADIO_SERVER_PORT", "PORT"), int, "port (default: first free from 7860)", _field("server_port")),
)


def method_flags() -> list[ConfigFlag]:
    """Per registered method: its checkpoint, then each option its spec offers the app."""
    flags = []
    for method in list_methods():
        spec = get_spec(method)
        prefix = method.upper().replace("-", "_")
        note = "a file, a folder, 'official[:<set>]' or 'hf-hub:<org>/<repo>'; none = the official cache if fetched, else training-free" if spec.trained_offline else "a learned-state file"
        flags.append(ConfigFlag(f"--{method}-checkpoint", (f"{prefix}_CHECKPOINT",), str, f"{spec.display_name} checkpoint ({note})", _checkpoint(method)))
        for name in spec.app_options:
            option = spec.options[name]
            choices = [c for c in (option.choices or ()) if c is not None]
            text = option.help + (f" (one of {', '.join(map(str, choices))})" if choices else "")
            flags.append(
                ConfigFlag(
                    f"--{method}-{name.replace('_', '-')}",
                    (f"{prefix}_{name.upper()}",),
                    _checked(option.kind, choices, f"--{method}-{name.replace('_', '-')}"),
                    f"{spec.display_name}: {text}",
                    _method_option(method, name),
                )
            )
    return flags


def config_flags() -> list[ConfigFlag]:
    return [*COMMON_FLAGS[:2], *method_flags(), *COMMON_FLAGS[2:]]


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="CLIP anomaly inspection app. Every flag can also be set by the environment variable named in "
        "brackets; a flag wins over its variable.",
    )
    for item in config_flags():
        parser.add_argument(item.flag, dest=_dest(item.flag), type=str, default=None, help=f"{item.help} [{' / '.join(item.variables)}]")
    parser.add_argument(
        "--no-examples", action="store_true", default=None, help="do not offer the example sets [DETECTOR_NO_EXAMPLES=1]"
    )
    parser.add_argument(
        "--no-warm-start", action="store_true", default=None,
        help="do not build the models in the background at start-up (tests, low memory) [DETECTOR_WARM_START=0]",
    )
    return parser


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Flags first, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = config_parser().parse_args(list(argv) if argv is not None else None)
    values: dict[str, Any] = {}
    for item in config_flags():
        text, source = getattr(args, _dest(item.flag)), item.flag
        if text is None:
            source = next((v for v in item.variables if environ.get(v, "").strip()), None)
            text = environ[source].strip() if source else None
        if text is None:
            continue
        try:
            item.store(values, item.kind(text))
        except ValueError as error:
            detail = str(error) if str(error).startswith("--") else f"{source}={text!r} is not a valid {item.kind.__name__}"
            raise SystemExit(detail) from None
    no_examples = args.no_examples or environ.get("DETECTOR_NO_EXAMPLES", "").strip().lower() in {"1", "true", "yes"}
    no_warm = args.no_warm_start or environ.get("DETECTOR_WARM_START", "").strip().lower() in {"0", "false", "no", "off"}
    return AppConfig(examples=not no_examples, warm_start=not no_warm, **values)


__all__ = ["AppConfig", "COMMON_FLAGS", "ConfigFlag", "config_flags", "config_parser", "limits", "method_flags", "parse_config"]
