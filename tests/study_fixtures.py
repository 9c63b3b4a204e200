"""Small sim studies for integration tests: real Ray, real Optuna SQLite, real HTTP sim servers."""
from __future__ import annotations

import textwrap
from pathlib import Path


def write_study(tmp: Path, *, name: str = "itest", trials: int = 6, parallel: int = 2, search: str | None = None,
                extra: str = "", duration_s: float = 3, qps: float = 4, gpus: int = 2,
                sampler: str = "{kind: tpe, seed: 3}") -> Path:
    search = search or """
      tensor_parallel: [1, 2]
      max_concurrency: [8, 32, 128]
      quantization: [none, fp8]
    """
    search_block = textwrap.indent(textwrap.dedent(search).strip(), "  ")
    text = textwrap.dedent(f"""
    name: {name}
    model: {{preset: llama-3.2-1b}}
    engines: [sim]
    hardware: {{gpu: h100, gpus: {gpus}}}
    workload:
      dataset: {{kind: random, input_tokens: 128, output_tokens: 16, num_requests: 40}}
      scenarios:
        - {{kind: server, qps: {qps}, duration_s: {duration_s}, sla: {{ttft_p99_ms: 2000, tpot_p99_ms: 100}}}}
    objectives:
      - {{metric: output_tokens_per_s_per_gpu, scenario: server}}
      - {{metric: tpot_p99_ms, scenario: server, direction: minimize}}
    sampler: {sampler}
    budget: {{trials: {trials}, parallel: {parallel}}}
    output_dir: {tmp / 'run'}
    """)
    text += "search:\n" + search_block + "\n" + textwrap.dedent(extra)
    path = tmp / "study.yaml"
    path.write_text(text)
    return path
