"""Flags shared by every command line (README "Command line").

Methods and their options come from the registry: ``--method`` accepts the registered
names, and each method option becomes a flag ``--<method>-<option>`` (e.g. a method
``m`` with an option ``steps`` gives ``--m-steps``), besides the generic
``--option [METHOD.]KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from .registry import get_spec, list_methods, method_options
from .requests import resolve_methods
from .runtime import RUNTIMES, RUNTIME_VARIABLE, default_runtime
from .spec import Option


def _methods_text() -> str:
    return ", ".join(list_methods())


def add_common_arguments(parser: argparse.ArgumentParser, *, method: bool = True, multiple_methods: bool = False) -> None:
    """Add ``--method``, ``--backbone``, ``--backbone-weights``, ``--checkpoint``,
    ``--class-name``, ``--device``, ``--seed`` and ``--out``; commands that run methods
    (``method=True``) also get ``--runtime`` (default ``DETECTOR_RUNTIME``, else auto)."""
    if method:
        if multiple_methods:
            parser.add_argument("--method", nargs="+", default=None, help=f"method name(s) or 'all': {_methods_text()}")
        else:
            parser.add_argument("--method", default=None, help=f"method name: {_methods_text()}")
    parser.add_argument("--backbone", default=None, help="open_clip model name (default: the method's official one; 'tiny-test' for a small random model)")
    parser.add_argument("--backbone-weights", default=None, help="open_clip pretrained tag, local file, 'hf-hub:...' or 'random'")
    parser.add_argument("--checkpoint", default=None, help="method weights: local file or 'hf-hub:<org>/<repo>/<file>'")
    parser.add_argument("--class-name", default="object", help="object word used in text prompts (default: object)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if method:
        parser.add_argument(
            "--runtime",
            choices=list(RUNTIMES),
            default=default_runtime(),
            help=f"what runs the frozen image encoders: torch, openvino or auto (OpenVINO on the CPU when its "
            f"conversion succeeds) [{RUNTIME_VARIABLE}; default: {default_runtime()}]",
        )
    parser.add_argument("--out", default=None, help="output file or folder")


def detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``create_detector`` taken from parsed common flags."""
    return {
        "backbone": args.backbone,
        "backbone_weights": args.backbone_weights,
        "checkpoint": args.checkpoint,
        "device": args.device,
        "class_name": args.class_name,
        "seed": args.seed,
        **({"runtime": args.runtime} if getattr(args, "runtime", None) else {}),
    }


__all__ = ["add_common_arguments", "add_option_arguments", "detector_kwargs", "options_from_args", "resolve_methods", "resolve_options"]


# -- method options ----------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_dest(method: str, key: str) -> str:
    return f"method_option__{method}__{key}"


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """``--option [METHOD.]KEY=VALUE`` and one ``--<method>-<option>`` flag per method option."""
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="a method option (repeatable), e.g. --option sigma=4; without METHOD. it applies to every selected "
        "method that has the option; VALUE is read as JSON when possible (4, 0.5, true, null) else as text",
    )
    for method in list_methods():
        spec = get_spec(method)
        for key, option in spec.options.items():
            parser.add_argument(f"--{method}-{key.replace('_', '-')}", dest=_flag_dest(method, key), **_flag_kwargs(spec.display_name, option))


def _flag_kwargs(display_name: str, option: Option) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"default": None, "help": f"{display_name}: {option.help or 'see the README'} (default {option.default})"}
    if option.kind is bool:
        kwargs["type"] = _parse_bool
    else:
        kwargs["type"] = option.kind
        choices = [c for c in (option.choices or ()) if c is not None]
        if choices:
            kwargs["choices"] = choices
    return kwargs


def resolve_options(items: Sequence[str], methods: Sequence[str], *, what: str = "selected") -> dict[str, dict[str, Any]]:
    """``--option`` items as ``{method: {key: value}}``; ``what`` names the methods in errors."""
    result: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--option {item!r}: expected [METHOD.]KEY=VALUE")
        key, value = item.split("=", 1)
        target, _, option = key.strip().rpartition(".")
        parsed = _parse_value(value.strip())
        if target:
            if target.lower() not in result:
                raise ValueError(f"--option {item!r}: method {target!r} is not among the {what} methods {', '.join(methods)}")
            result[target.lower()][option] = parsed
            continue
        takers = [m for m in methods if option in method_options(m)]
        if not takers:
            raise ValueError(f"--option {item!r}: no {what} method has an option {option!r}")
        for method in takers:
            result[method][option] = parsed
    return result


def options_from_args(args: argparse.Namespace, methods: Sequence[str], *, what: str = "selected") -> dict[str, dict[str, Any]]:
    """``{method: {key: value}}`` from ``--option`` items, then the ``--<method>-<option>`` flags."""
    result = resolve_options(getattr(args, "option", None) or [], methods, what=what)
    for method in methods:
        for key in get_spec(method).options:
            value = getattr(args, _flag_dest(method, key), None)
            if value is not None:
                result[method][key] = value
    return result
