"""`k2jax serve`: the OpenAI-compatible HTTP server from the command line.

Loads a checkpoint (or builds a preset with random weights), starts one engine in a background
thread and serves `serve.server.OpenAIServer` with uvicorn until interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from k2jax.text.chat_formats import CHAT_FORMATS
from serve.parsers import REASONING_FIELDS

EXAMPLE = """\
example (random weights, CPU):
  k2jax serve --preset tiny --port 8000 &
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "k2jax-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}'

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model="k2jax-tiny", messages=[...], extra_body={"heavy": {"n": 4}})

The API key comes from --api-key or the K2JAX_API_KEY environment variable; without either the
server accepts every request (it binds 127.0.0.1 unless --host says otherwise).
"""

API_KEY_ENV = "K2JAX_API_KEY"
PRESETS = ("tiny", "small")
# The test tokenizer's built-in corpus supports at most this many ids (256 bytes + merges + 256
# special slots).
TEST_TOKENIZER_MAX_VOCAB = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="an Orbax checkpoint (k2jax.load)")
    source.add_argument("--preset", choices=PRESETS,
                        help="a small model with random weights, for trying the server out")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tiktoken.model (or its directory); default: the checkpoint's, or a "
                             "test tokenizer for presets")
    parser.add_argument("--model-name", help="the model id clients send (default: the preset "
                                             "as k2jax-NAME, or the checkpoint's directory name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="default %(default)s")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--mesh", metavar="AXES",
                        help="device mesh to serve on, as `k2jax train --mesh`: e.g. expert=8, "
                             "expert=4,tensor=2, data=2,expert=4 (default: one device)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="sequences decoded together (default %(default)s)")
    parser.add_argument("--max-seq-len", type=int,
                        help="context per sequence, prompt + output (default: the model's, at "
                             "most 4096)")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="longest prompt accepted (default: the context minus one)")
    parser.add_argument("--max-tokens", type=int,
                        help="most output tokens per completion (default: the context minus one)")
    parser.add_argument("--seed", type=int, default=0, help="random weights' seed for presets")
    parser.add_argument("--chat-template", choices=("auto",) + tuple(CHAT_FORMATS),
                        default="auto",
                        help="which K2 chat template to render prompts with: auto (default) "
                             "reads the checkpoint's chat_template.jinja, else K2 Thinking's")
    parser.add_argument("--reasoning-field", choices=("both",) + REASONING_FIELDS,
                        default="both",
                        help="the response field reasoning goes out under: `reasoning` (vLLM's "
                             "current name), `reasoning_content` (DeepSeek's and vLLM's "
                             "earlier one) or both (default)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))


def load_model_and_tokenizer(args, mesh=None):
    """`(config, params, tokenizer, model_name)` from the command-line arguments; a checkpoint
    is read straight onto `mesh` (each device's shards only) when given."""
    import k2jax
    from k2jax.text import load_tokenizer

    if args.checkpoint:
        config, params = k2jax.load(args.checkpoint, mesh)
        name = os.path.basename(os.path.normpath(args.checkpoint))
        try:
            tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (--tokenizer PATH)") from None
    else:
        config = k2jax.ModelConfig.preset(args.preset)
        name = f"k2jax-{args.preset}"
        config, tokenizer = preset_and_tokenizer(config, args.preset, args.tokenizer)
        params = random_params(config, args.seed)
    if getattr(args, "chat_template", "auto") != "auto":
        tokenizer.chat_format = CHAT_FORMATS[args.chat_template]
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
                         f"{config.vocab_size}")
    return config, params, tokenizer, args.model_name or name


def random_params(config, seed: int = 0):
    """Random weights for trying a preset out: norms 1, router biases 0, everything else
    normal(0, 0.02), drawn on the host into the abstract tree (`k2jax.init_params` compiles
    the whole model's initialisation, many times slower on a CPU)."""
    import jax
    import numpy as np

    import k2jax

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if name == "['scale']":
            values = np.ones(leaf.shape)
        elif name == "['e_score_correction_bias']":
            values = np.zeros(leaf.shape)
        elif np.issubdtype(leaf.dtype, np.integer):
            values = rng.integers(-8, 8, leaf.shape)
        else:
            values = rng.normal(0.0, 0.02, leaf.shape)
        return jax.numpy.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, k2jax.param_shapes(config))


def preset_and_tokenizer(config, preset: str, tokenizer_path=None):
    """A random-weights preset and its tokenizer: the one at `tokenizer_path`, else the test
    tokenizer (said on stderr); the config's vocabulary becomes the tokenizer's."""
    from k2jax.text import load_tokenizer
    from k2jax.text.testing import tiny_tokenizer

    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        tokenizer = tiny_tokenizer(min(config.vocab_size, TEST_TOKENIZER_MAX_VOCAB))
        print(f"note: --preset {preset} has no tokenizer: using the {tokenizer.vocab_size}"
              "-id test tokenizer (k2jax.text.testing.tiny_tokenizer); the weights are "
              "random, so the text is too", file=sys.stderr)
    if tokenizer.vocab_size < config.vocab_size:
        print(f"note: the random model's vocabulary is cut from {config.vocab_size} to the "
              f"tokenizer's {tokenizer.vocab_size} ids", file=sys.stderr)
    return preset_for_tokenizer(config, tokenizer), tokenizer


def preset_for_tokenizer(config, tokenizer):
    """A preset whose vocabulary and bos/eos ids are the tokenizer's (random weights only:
    the presets' own ids are placeholders, and eos 2 would be a byte of a test tokenizer)."""
    return dataclasses.replace(config, vocab_size=tokenizer.vocab_size,
                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def run(args: argparse.Namespace) -> int:
    import socket

    import jax

    from k2jax import sharding
    from serve import chat, multihost
    from serve.engine import Engine
    from serve.server import ServerLimits

    # Several processes (a pod, or `JAX_COORDINATOR_ADDRESS` and friends): process 0 serves
    # and schedules, the others follow its steps (`serve.multihost`).
    several = sharding.initialize_distributed()
    leader = not several or multihost.is_leader()
    listener = None
    if leader:
        try:  # before loading a model for minutes: a busy port is found at once
            listener = socket.create_server((args.host, args.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    if several and mesh is None:
        raise ValueError("serving on several processes needs --mesh over their devices")
    config, params, tokenizer, model_name = load_model_and_tokenizer(args, mesh)
    engine = Engine(config, params, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    detokenize=chat.detokenizer(tokenizer), mesh=mesh)
    if not leader:
        print(f"process {jax.process_index()}: following process 0's steps", file=sys.stderr,
              flush=True)
        multihost.follow(engine)
        return 0
    context = engine.max_seq_len
    limits = ServerLimits(max_seq_len=context,
                          max_prompt_tokens=args.max_prompt_tokens or context - 1,
                          max_tokens=args.max_tokens or context - 1)
    print(f"serving {model_name!r} on http://{args.host}:{args.port}/v1 (context {context}, "
          f"max batch {args.max_batch}"
          f"{f', mesh {args.mesh}' if mesh is not None else ''}"
          f"{', API key required' if args.api_key else ''})",
          file=sys.stderr, flush=True)
    fields = REASONING_FIELDS if args.reasoning_field == "both" else (args.reasoning_field,)
    status = serve_engine(engine, tokenizer, listener, model_name=model_name, limits=limits,
                          api_key=args.api_key, log_level=args.log_level,
                          reasoning_fields=fields)
    if several and status:
        # A lost host: jax.distributed's exit would wait minutes for it at a barrier, and a
        # supervisor should restart the job now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def serve_engine(engine, tokenizer, listener, *, model_name: str, limits, api_key=None,
                 log_level: str = "info", reasoning_fields=REASONING_FIELDS) -> int:
    """Serves `engine` on the bound socket `listener` until interrupted (0) or until the
    engine fails (1: the requests in flight get an error, then the server shuts down, so that
    a supervisor restarts the process)."""
    import uvicorn

    from serve.engine_loop import EngineLoop
    from serve.server import OpenAIServer

    def engine_failed(error: BaseException) -> None:  # requests fail only while it serves
        print(f"error: the engine failed, shutting down: {error!r}", file=sys.stderr,
              flush=True)
        server.should_exit = True

    loop = EngineLoop(engine, on_failure=engine_failed).start()
    app = OpenAIServer(loop, tokenizer, model_name=model_name, limits=limits,
                       api_key=api_key, reasoning_fields=reasoning_fields).app()
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    try:
        server.run(sockets=[listener])
    finally:
        loop.stop()
        listener.close()
        if loop.failure is None:
            engine.release_followers()
    return 1 if loop.failure is not None else 0
