"""``servetune export``: the chosen trial as a deployment (see :mod:`servetune.optimizer.export`).

    servetune export RUN_DIR --trial best --format k8s -o deploy/

Prints the choice (objective, scenario, SLA filter, runner-up), any warnings, and the files written.
Exit status: 0 written, 2 a user error (no such trial, no trial met the SLA, a format the trial's engine has not:
a sim trial exports as sim/command, compose, k8s and json).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from servetune.optimizer.cli.command import Command, run_alone
from servetune.optimizer.cli.common import EXIT_USAGE
from servetune.optimizer.export import FORMATS, QUALITY_WARNING, ExportError, Options, export


def _print_err(m: str) -> None:
    print(m, file=sys.stderr)


def add_cli_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("run_dir", help="a run directory (runs/<study>/)")
    e.add_argument("--trial", default="best", help="'best' (default) or a trial number")
    e.add_argument("--scenario", help="scenario whose results choose (default: the objective's scenario)")
    e.add_argument("--objective", metavar="METRIC", help="metric to rank by (default: the study's first objective)")
    e.add_argument("--format", "-f", dest="fmt", required=True, choices=FORMATS,
                   help="vllm / sglang / sim / command: launch script + bench.sh; compose; k8s; helm; kserve; "
                        "ray-serve (vLLM only); json. A sim trial exports as sim, command, compose, k8s or json "
                        "(the simulated server, no GPU: a rehearsal of the deployment)")
    e.add_argument("-o", "--output-dir", required=True, help="directory to write into (created)")
    d = e.add_argument_group("deployment")
    d.add_argument("--host", help="listen address of the shell command / compose port binding (default 127.0.0.1; "
                                  "containers always listen on 0.0.0.0 inside)")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--image", help="container image; {version} is replaced (default vllm/vllm-openai:v{version}, "
                                   "lmsysorg/sglang:v{version}-cu129)")
    d.add_argument("--model-path", help="what the deployment loads: a path in the container (default /models/<dir>) "
                                        "or a Hugging Face id")
    d.add_argument("--model-host-path", help="host directory bound into the compose container (default: the "
                                             "path the trial loaded)")
    d.add_argument("--name", help="app / release name (default <study>-<engine>)")
    d.add_argument("--namespace")
    d.add_argument("--secret-name",
                   help="Kubernetes Secret holding the ${NAME} env references (default <name>-secrets)")
    d.add_argument("--pvc", help="existing PersistentVolumeClaim with the model (default: create <name>-models)")
    d.add_argument("--pvc-size", default="200Gi")
    d.add_argument("--storage-class")
    d.add_argument("--cpu", help="CPU request (default 8 per GPU)")
    d.add_argument("--memory", help="memory request and limit (default 64Gi per GPU)")
    d.add_argument("--shm-size", default="16Gi")
    d.add_argument("--gpu-ids", help="compose: pin these device ids (comma list) instead of a count")
    d.add_argument("--startup-margin", type=float, default=2.0,
                   help="startup probe budget = measured start x MARGIN + 120 s (default 2)")
    d.add_argument("--replicas", type=int, default=1)
    d.add_argument("--keep-load-format", action="store_true",
                   help="keep --load-format dummy if the trial used it (random weights; benchmarking only)")


@dataclass
class ExportCommand(Command):
    name = "export"
    help = ("write the chosen trial as a deployment (command, compose, k8s, helm, kserve, ray-serve, json; "
            "a sim trial: command, compose, k8s, json)")
    description = ("Render the chosen trial of a run directory as a ready deployment. 'best' = the best value "
                   "of the objective (default: the study's first) in the scenario, among completed trials that "
                   "met the SLA in every scenario that has one.")

    # the deployment's ~20 options travel as parsed: export.Options is their one typed home
    args: argparse.Namespace
    out: Callable[[str], None] = print
    err: Callable[[str], None] = _print_err

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_cli_args(parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ExportCommand:
        return cls(args)

    def run(self) -> int:
        return cmd_export(self.args, self.out, self.err)


def cmd_export(args: argparse.Namespace, out: Callable[[str], None] = print,
               err: Callable[[str], None] = _print_err) -> int:
    opts = Options(host=args.host, port=args.port, image=args.image, model_path=args.model_path,
                   model_host_path=args.model_host_path, name=args.name, namespace=args.namespace,
                   secret_name=args.secret_name, pvc=args.pvc, pvc_size=args.pvc_size,
                   storage_class=args.storage_class, cpu=args.cpu, memory=args.memory, shm_size=args.shm_size,
                   gpu_ids=[g.strip() for g in args.gpu_ids.split(",")] if args.gpu_ids else None,
                   startup_margin=args.startup_margin, keep_load_format=args.keep_load_format,
                   replicas=args.replicas)
    try:
        res = export(args.run_dir, trial=args.trial, scenario=args.scenario, objective=args.objective,
                     fmt=args.fmt, out_dir=args.output_dir, options=opts)
    except ExportError as e:
        err(f"servetune export: {e}")
        return EXIT_USAGE
    out(res.choice.describe())
    for w in res.warnings:
        if w.startswith(QUALITY_WARNING):  # about the model's answers: a banner nobody scrolls past
            err("!" * 100)
            err(f"!! WARNING: {w[len(QUALITY_WARNING):]}")
            err("!" * 100)
        else:
            err(f"warning: {w}")
    for f in res.files:
        out(f"wrote {f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_alone(ExportCommand, ["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
