"""The `brook` command line: model repository management and offline use of the models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import BrookError
from app.paths import default_model_dir
from app.repository import ModelRepository, VersionState

if TYPE_CHECKING:
    from app.text.local_chat import SamplingOptions

logger = logging.getLogger("brook")


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from app.convert.build import build_version

    repository = ModelRepository(args.model_dir)
    names = args.names or repository.names()
    specs = [repository.spec(name) for name in names]
    for spec in specs:
        for version in sorted(spec.versions):
            result = build_version(spec, version, force=args.force)
            state = "built" if result.built else "already up to date, nothing to do"
            print(f"{spec.name} v{version}: {state} ({result.seconds:.1f} s)")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    repository = ModelRepository(args.model_dir)
    rows: list[dict[str, object]] = []
    for spec in repository.specs():
        for version in sorted(spec.versions):
            status = repository.status(spec, version)
            vspec = spec.versions[version]
            rows.append({
                "name": spec.name,
                "task": spec.task,
                "version": version,
                "default": version == spec.default_version,
                "weight": vspec.weight,
                "state": status.state.value,
                "detail": status.detail,
                "description": vspec.description,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {repository.root}")
        return 0
    print(f"{'MODEL':<24} {'TASK':<16} {'VERSION':<8} {'STATE':<8} {'WEIGHT':<7} DESCRIPTION")
    for row in rows:
        label = f"{row['version']}{'*' if row['default'] else ''}"
        print(f"{row['name']:<24} {row['task']:<16} {label:<8} {row['state']:<8} {row['weight']:<7.2f} "
              f"{row['description']}")
    print("(* default version)")
    broken = [r for r in rows if r["state"] == VersionState.BROKEN.value]
    for row in broken:
        print(f"warning: {row['name']} v{row['version']}: {row['detail']}", file=sys.stderr)
    return 0


def _format_timestamp(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes):02d}:{rest:06.3f}"


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from app.audio import load_audio
    from app.speech.transcribe import TranscriptionOptions, transcribe
    from app.speech.whisper_runner import WhisperRunner

    if args.beam_size < 1:
        print(f"brook: error: --beam-size must be at least 1, got {args.beam_size}", file=sys.stderr)
        return 2
    audio = load_audio(args.file)
    loaded = ModelRepository(args.model_dir).load(args.model, args.version)
    runner = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=args.threads)
    result = transcribe(audio, runner, options=TranscriptionOptions(beam_size=args.beam_size))
    if args.json:
        print(json.dumps({
            "model": loaded.name,
            "version": loaded.version,
            "duration": round(len(audio) / 16000, 3),
            "text": result.text,
            "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in result.segments],
        }, ensure_ascii=False, indent=2))
    else:
        for segment in result.segments:
            print(f"[{_format_timestamp(segment.start)} --> {_format_timestamp(segment.end)}] {segment.text.strip()}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.config import settings_from_env
    from app.server.serve import serve

    overrides = {
        "host": args.host, "port": args.port, "model_dir": args.model_dir,
        "models": tuple(args.models) if args.models else None,
        "api_keys": tuple(args.api_key) if args.api_key else None,
    }
    try:
        settings = settings_from_env().with_overrides(overrides)
    except ValueError as exc:  # a BROOK_* variable that does not parse or is out of range
        print(f"brook: error: {exc}", file=sys.stderr)
        return 2
    serve(settings, workers=args.workers, fetch=not args.no_fetch)
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    import asyncio

    from app.client import listen, with_query

    if args.file is None and not args.mic:
        raise BrookError("give an audio FILE or --mic")
    url = with_query(args.url, model=args.model, version=args.version, beam_size=args.beam_size)
    asyncio.run(listen(url, None if args.mic else args.file, speed=args.speed, token=args.token, as_json=args.json))
    return 0


def _sampling_options(args: argparse.Namespace) -> SamplingOptions:
    from app.text.local_chat import SamplingOptions

    return SamplingOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(getattr(args, "stop", None) or ()),
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from app.text import local_chat

    params = _sampling_options(args).to_params()  # bad values fail before the model loads
    if args.no_template and args.system is not None:
        raise BrookError("--system needs the chat template; drop --system or --no-template")
    loaded = local_chat.load_text_model(args.model_dir, args.model, args.version)

    async def run() -> None:
        async with local_chat.local_engine(loaded, threads=args.threads) as engine:
            done = await local_chat.generate(
                engine, args.prompt, params, use_template=not args.no_template, as_json=args.json,
                out=sys.stdout, system=args.system,
            )
            if not args.json:
                print(local_chat.describe_done(done), file=sys.stderr)

    asyncio.run(run())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    from app.text import local_chat

    if args.url is not None:
        from app.client import chat_remote, with_query

        url = with_query(args.url, model=args.model, version=args.version)
        asyncio.run(chat_remote(url, token=args.token, sampling=_sampling_options(args).to_wire()))
        return 0
    params = _sampling_options(args).to_params()
    loaded = local_chat.load_text_model(args.model_dir, args.model or local_chat.DEFAULT_TEXT_MODEL, args.version)

    async def run() -> None:
        async with local_chat.local_engine(loaded, threads=args.threads) as engine:
            banner = f"{loaded.name} v{loaded.version} in-process (context {engine.context_length} tokens)"
            await local_chat.chat(engine, params, stdin=sys.stdin, out=sys.stdout, system=args.system, banner=banner)

    asyncio.run(run())
    return 0


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, stop: bool) -> None:
    from app.text.sampling import DEFAULT_MAX_TOKENS

    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default: the model's recommended 0.2")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default 0.9")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = no limit)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="[-2, 2]: lowered logit of every token the reply already used (default 0, off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="[-2, 2]: the same, per use (default 0, off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="(0, 10]: divides prompt and reply tokens' logits (default 1, off; 1.1-1.3 curbs loops)")
    if stop:
        parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                            help="stop before this text (repeatable; may span tokens)")
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's own, if it has one)")
    parser.add_argument("--version", type=int, default=None, help="model version (default: the default one)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brook", description="Brook: real-time inference server.")
    parser.add_argument("--model-dir", type=Path, default=default_model_dir(),
                        help="model repository folder (env BROOK_MODEL_DIR; default: the checkout's models/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="manage the model repository")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = models_commands.add_parser("fetch", help="download pinned sources, verify sha256, convert to ONNX")
    fetch.add_argument("names", nargs="*", help="models to fetch (default: every model in the repository)")
    fetch.add_argument("--force", action="store_true", help="rebuild even when up to date")
    fetch.set_defaults(handler=_cmd_models_fetch)
    listing = models_commands.add_parser("list", help="models, versions, and whether each is ready")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_cmd_models_list)

    serve = commands.add_parser("serve", help="run the server (fetches and converts missing models first)")
    serve.add_argument("--host", default=None, help="interface (env BROOK_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (env BROOK_PORT; default 8000)")
    serve.add_argument("--models", nargs="+", default=None, help="models to load (env BROOK_MODELS, comma-separated)")
    serve.add_argument("--api-key", action="append", default=None,
                       help="require this API key (repeatable; env BROOK_API_KEYS, comma-separated)")
    serve.add_argument("--workers", type=int, default=int(os.environ.get("BROOK_WORKERS", "1")),
                       help="uvicorn worker processes, each with its own engines (env BROOK_WORKERS; default 1)")
    serve.add_argument("--no-fetch", action="store_true", help="do not fetch or convert missing models")
    serve.set_defaults(handler=_cmd_serve)

    listen = commands.add_parser("listen", help="stream a file or the microphone to a running server")
    listen.add_argument("file", type=Path, nargs="?", help="audio file (WAV, FLAC, OGG, …)")
    listen.add_argument("--mic", action="store_true", help="stream the microphone (needs arecord or sox)")
    listen.add_argument("--url", default="ws://127.0.0.1:8000/v1/listen", help="the server's /v1/listen URL")
    listen.add_argument("--model", default=None)
    listen.add_argument("--version", type=int, default=None)
    listen.add_argument("--token", default=os.environ.get("BROOK_TOKEN"), help="API key (env BROOK_TOKEN)")
    listen.add_argument("--speed", type=float, default=1.0, help="1 = real time, 4 = four times, 0 = no pacing")
    listen.add_argument(
        "--beam-size", type=int, default=None, help="beam of the finals, 1-8 (default: the server's setting)"
    )
    listen.add_argument("--json", action="store_true", help="print every server message as JSON")
    listen.set_defaults(handler=_cmd_listen)

    transcribe = commands.add_parser("transcribe", help="transcribe an audio file (WAV, FLAC, OGG, …)")
    transcribe.add_argument("file", type=Path)
    transcribe.add_argument("--model", default="whisper-tiny-en")
    transcribe.add_argument("--version", type=int, default=None, help="model version (default: the default one)")
    transcribe.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    transcribe.add_argument("--json", action="store_true", help="print JSON with segments")
    transcribe.add_argument(
        "--beam-size", type=int, default=1, help="beam search with this many hypotheses (default 1: greedy)"
    )
    transcribe.set_defaults(handler=_cmd_transcribe)

    generate = commands.add_parser("generate", help="generate text with a local language model, streamed to stdout")
    generate.add_argument("prompt", help="the user's message (or, with --no-template, the text to continue)")
    generate.add_argument("--model", default="smollm2-135m-instruct")
    _add_sampling_arguments(generate, stop=True)
    generate.add_argument("--no-template", action="store_true",
                          help="continue the prompt as raw text instead of rendering it with the chat template")
    generate.add_argument("--json", action="store_true",
                          help="one JSON record per token delta, then a usage/timings record")
    generate.set_defaults(handler=_cmd_generate, quiet_logging=True)

    chat = commands.add_parser("chat", help="interactive multi-turn chat in the terminal (local model or --url)")
    chat.add_argument("--url", default=None,
                      help="chat with a running server's /v1/chat (ws://HOST:PORT/v1/chat) instead of in-process")
    chat.add_argument("--token", default=os.environ.get("BROOK_TOKEN"), help="API key for --url (env BROOK_TOKEN)")
    chat.add_argument("--model", default=None, help="model (default: smollm2-135m-instruct, or the server's)")
    _add_sampling_arguments(chat, stop=False)
    chat.set_defaults(handler=_cmd_chat, quiet_logging=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, quiet=getattr(args, "quiet_logging", False))
    try:
        code: int = args.handler(args)
    except BrookError as exc:
        print(f"brook: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
