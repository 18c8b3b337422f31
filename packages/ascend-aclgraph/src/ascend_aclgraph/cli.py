"""``ascend-graph``: explain which graph mode and which graphs a configuration gets.

``ascend-graph explain`` runs the same resolution and dispatcher code as the runtime, with no
model and no device, and prints the effective mode, every narrowing step, and the graphs that
would be captured. Exit status: 0 on success, 2 for a bad flag value or contradictory flags, 1 for
a configuration no graph mode can serve (the message says what to change). With ``--json`` an
error is printed as a JSON object on stdout too, ``{"error": ..., "exit_status": ...}``, so a
script reading stdout always gets JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from ascend_aclgraph.attention_support import (
    ASCEND_ATTENTION_BACKENDS,
    AttentionSupport,
    UnknownAttentionBackendError,
    resolve_attention_support,
)
from ascend_aclgraph.capture_sizes import (
    DEFAULT_MAX_CAPTURE_SIZE,
    CaptureSizes,
    default_capture_sizes,
)
from ascend_aclgraph.dispatcher import GraphDispatcher
from ascend_aclgraph.errors import CaptureSizeError, GraphModeError
from ascend_aclgraph.modes import BatchDescriptor, GraphMode
from ascend_aclgraph.resolution import resolve_graph_mode

__all__ = ["build_parser", "main"]

_E = TypeVar("_E", GraphMode, AttentionSupport)
_DEFAULT_MAX_NUM_SEQS = 256
_JSON_FLAG = "--json"


class _CliError(Exception):
    """A failed command: the parser whose prog prefixes the message, and the exit status."""

    def __init__(self, parser: argparse.ArgumentParser, message: str, status: int) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors can be raised instead of printed, for ``--json``.

    argparse prints a usage error and exits from inside ``parse_args``. Raising it instead lets
    :func:`main` print it as JSON when ``--json`` was asked for. Subparsers inherit the class
    and the ``raise_errors`` keyword through ``add_parser``.
    """

    def __init__(self, *args: Any, raise_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message: str) -> NoReturn:
        if not self.raise_errors:
            super().error(message)
        raise _CliError(self, message, 2)


def _enum_arg(parse: Callable[[str], _E]) -> Callable[[str], _E]:
    def convert(text: str) -> _E:
        try:
            return parse(text)
        except ValueError as exc:
            # ArgumentTypeError makes argparse print our message after the flag name.
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _size_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return [_positive_int(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    """The ``ascend-graph`` argument parser (exposed for documentation and tests).

    Its errors print the usage and exit with status 2, as any argparse parser's do.
    """
    return _build_parser(raise_errors=False)


def _build_parser(*, raise_errors: bool) -> _Parser:
    parser = _Parser(
        prog="ascend-graph",
        description="Inspect graph-mode decisions without loading a model.",
        raise_errors=raise_errors,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    explain = commands.add_parser(
        "explain",
        help="print the effective graph mode, why, and the graphs that would be captured",
        description=(
            "Resolve a requested graph mode against the attention backend and model features, "
            "and list the graphs that would be captured. Exit status 1 means no graph mode "
            "can serve the request; the message says what to change. Exit status 2 means a "
            "bad or contradictory flag."
        ),
        raise_errors=raise_errors,
        # Abbreviated flags are off so that "--json" is recognised before parsing exactly as
        # the parser would see it: a parse error is then reported as JSON too.
        allow_abbrev=False,
    )
    modes = ",".join(m.name for m in GraphMode)
    supports = ",".join(s.name for s in AttentionSupport)
    explain.add_argument(
        "--mode",
        type=_enum_arg(GraphMode.parse),
        default=GraphMode.FULL_AND_PIECEWISE,
        metavar=f"{{{modes}}}",
        help="requested graph mode, any case (default: FULL_AND_PIECEWISE, vLLM's default)",
    )
    explain.add_argument(
        "--attention-support",
        type=_enum_arg(AttentionSupport.parse),
        default=None,
        metavar=f"{{{supports}}}",
        help=(
            "graph support of the weakest attention backend, any case (default: the level of "
            "--attention-backend in the table of known backends; ALWAYS if no backend is named)"
        ),
    )
    explain.add_argument(
        "--attention-backend",
        default=None,
        metavar="NAME",
        help="name of the weakest attention backend, any case; without --attention-support it "
        "must be one of: " + ", ".join(ASCEND_ATTENTION_BACKENDS),
    )
    explain.add_argument(
        "--attention-split",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="whether the compiled graph is split at attention (piecewise compilation; "
        "default: yes)",
    )
    explain.add_argument(
        "--uniform-decode-query-len",
        type=_positive_int,
        default=1,
        metavar="N",
        help="1 + number of speculative tokens (default: 1, no speculative decoding)",
    )
    explain.add_argument(
        "--context-parallel", action="store_true", help="context parallelism is enabled"
    )
    explain.add_argument(
        "--encoder-decoder", action="store_true", help="the model is an encoder-decoder model"
    )
    # Either the sizes themselves or the top of vLLM's grid: given both, one would be ignored.
    sizes = explain.add_mutually_exclusive_group()
    sizes.add_argument(
        "--capture-sizes",
        type=_size_list,
        default=None,
        metavar="N,N,...",
        help="comma-separated capture sizes (default: vLLM's grid up to --max-capture-size)",
    )
    sizes.add_argument(
        "--max-capture-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help=(
            "largest capture size (default: min(max_num_seqs * uniform_decode_query_len, "
            f"{DEFAULT_MAX_CAPTURE_SIZE}), as vllm-ascend picks it)"
        ),
    )
    explain.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=_DEFAULT_MAX_NUM_SEQS,
        metavar="N",
        help=f"largest number of requests in a batch (default: {_DEFAULT_MAX_NUM_SEQS})",
    )
    explain.add_argument(
        _JSON_FLAG,
        action="store_true",
        help='print one JSON object; an error too, as {"error": ..., "exit_status": ...}',
    )
    explain.set_defaults(handler=_explain, command_parser=explain)
    return parser


def _capture_sizes(args: argparse.Namespace) -> CaptureSizes:
    if args.capture_sizes is not None:
        return CaptureSizes(args.capture_sizes)
    max_size = args.max_capture_size
    if max_size is None:
        # vllm-ascend's platform default: no CUDA-style factor of 2 over the decode batch.
        max_size = min(args.max_num_seqs * args.uniform_decode_query_len, DEFAULT_MAX_CAPTURE_SIZE)
    return CaptureSizes(default_capture_sizes(max_size))


def _descriptor_json(desc: BatchDescriptor) -> dict[str, Any]:
    return desc._asdict()


def _descriptor_text(desc: BatchDescriptor) -> str:
    text = str(desc.num_tokens)
    if desc.uniform_decode:
        text += f"/{desc.num_reqs}"
    return text + ("+lora" if desc.has_lora else "")


def _explain(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        support, support_source, backend_name = resolve_attention_support(
            args.attention_support, args.attention_backend
        )
    except UnknownAttentionBackendError as exc:
        parser.error(f"argument --attention-backend: {exc} (--attention-support)")
    except ValueError as exc:
        parser.error(f"argument --attention-backend: {exc}")
    try:
        sizes = _capture_sizes(args)
    except CaptureSizeError as exc:
        flag = "--capture-sizes" if args.capture_sizes is not None else "--max-capture-size"
        parser.error(f"argument {flag}: {exc}")
    try:
        effective, reasons = resolve_graph_mode(
            args.mode,
            support,
            attention_is_split=args.attention_split,
            uniform_decode_query_len=args.uniform_decode_query_len,
            context_parallel=args.context_parallel,
            encoder_decoder=args.encoder_decoder,
            attention_backend=backend_name,
        )
    except GraphModeError as exc:
        raise _CliError(parser, str(exc), 1) from None
    try:
        dispatcher = GraphDispatcher(
            effective,
            sizes,
            max_num_seqs=args.max_num_seqs,
            uniform_decode_query_len=args.uniform_decode_query_len,
        )
    except CaptureSizeError as exc:
        parser.error(f"argument --uniform-decode-query-len: {exc}")
    graphs = dispatcher.capture_descriptors()

    if args.json:
        report = {
            "requested_mode": args.mode.name,
            "effective_mode": effective.name,
            "reasons": reasons,
            "inputs": {
                "attention_support": support.name,
                "attention_support_source": support_source,
                "attention_backend": backend_name,
                "attention_split": args.attention_split,
                "uniform_decode_query_len": args.uniform_decode_query_len,
                "context_parallel": args.context_parallel,
                "encoder_decoder": args.encoder_decoder,
                "max_num_seqs": args.max_num_seqs,
            },
            "capture_sizes": list(dispatcher.capture_sizes),
            "graphs": {mode.name: [_descriptor_json(d) for d in descs] for mode, descs in graphs},
        }
        print(json.dumps(report, indent=2))
        return 0

    backend = backend_name or "(unnamed)"
    lines = [
        f"requested mode:  {args.mode.name}",
        f"effective mode:  {effective.name}",
        f"attention:       {backend}, support {support.name} ({support_source}), "
        f"{'split' if args.attention_split else 'not split'}",
        f"decode query:    {args.uniform_decode_query_len} token(s) per request"
        + (" (speculative decoding)" if args.uniform_decode_query_len > 1 else ""),
        f"model:           context parallel {'yes' if args.context_parallel else 'no'}, "
        f"encoder-decoder {'yes' if args.encoder_decoder else 'no'}, "
        f"max_num_seqs {args.max_num_seqs}",
        f"capture sizes:   {len(dispatcher.capture_sizes)} sizes, "
        f"{dispatcher.capture_sizes.sizes[0]} to {dispatcher.max_capture_size}",
        "narrowing:" if reasons else "narrowing:       none, the requested mode runs as is",
    ]
    lines += [f"  {i}. {reason}" for i, reason in enumerate(reasons, 1)]
    if not graphs:
        lines.append("graphs:          none, every batch runs eagerly")
    else:
        lines.append(
            "graphs to capture (tokens, or tokens/requests for uniform decode; largest first):"
        )
        for mode, descs in graphs:
            body = " ".join(_descriptor_text(d) for d in descs)
            lines += textwrap.wrap(
                body,
                width=100,
                initial_indent=f"  {mode.name} ({len(descs)}): ",
                subsequent_indent="    ",
            )
    print("\n".join(lines))
    return 0


def _json_requested(argv: Sequence[str]) -> bool:
    # Decided before parsing, so that a parse error can be reported as JSON as well. Exact
    # matches only: the explain parser takes no abbreviations, and after "--" nothing is a flag.
    for arg in argv:
        if arg == "--":
            return False
        if arg == _JSON_FLAG or arg.startswith(_JSON_FLAG + "="):
            return True
    return False


def _report_error(error: _CliError, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": error.message, "exit_status": error.status}, indent=2))
    elif error.status == 2:
        # What argparse prints for a usage error.
        error.parser.print_usage(sys.stderr)
    # Errors are reported by the failing (sub)parser, so they read "ascend-graph explain: ...".
    print(f"{error.parser.prog}: error: {error.message}", file=sys.stderr)
    return error.status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ascend-graph`` command; returns the exit status."""
    # The narrowing lines are printed on stdout; keep the library's warnings off stderr here
    # unless the embedding program configured logging itself.
    package_logger = logging.getLogger("ascend_aclgraph")
    if not any(isinstance(h, logging.NullHandler) for h in package_logger.handlers):
        package_logger.addHandler(logging.NullHandler())
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _json_requested(argv)
    try:
        args = _build_parser(raise_errors=True).parse_args(argv)
        handler: Callable[[argparse.ArgumentParser, argparse.Namespace], int] = args.handler
        return handler(args.command_parser, args)
    except _CliError as exc:
        return _report_error(exc, as_json)


if __name__ == "__main__":
    sys.exit(main())
