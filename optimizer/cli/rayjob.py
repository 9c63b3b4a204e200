"""``servetune rayjob STUDY``: write a KubeRay RayJob that runs the study on a Kubernetes GPU cluster (the
manifest is built by :mod:`servetune.optimizer.rayjob`)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from servetune.optimizer.cli.command import Command
from servetune.optimizer.cli.common import EXIT_USAGE
from servetune.optimizer.rayjob import RayJobError, build_context, render
from servetune.optimizer.spec import SpecError


@dataclass
class RayJobCommand(Command):
    name = "rayjob"
    help = "write a KubeRay RayJob that runs a study on a Kubernetes GPU cluster"
    description = ("A ConfigMap with the study and a RayJob (ray.io/v1) whose head runs "
                   "`servetune run --ray-address auto`; see docs/cluster.md.")

    # the pod options travel as parsed: rayjob.build_context reads them
    args: argparse.Namespace

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study")
        parser.add_argument("--image", required=True,
                            help="an image with servetune, Ray and the engines (every pod runs it)")
        parser.add_argument("--model-claim", required=True,
                            help="PersistentVolumeClaim holding the model (mounted read-only)")
        parser.add_argument("--model-mount",
                            help="where the claim is mounted (default: the directory above model.path)")
        parser.add_argument("--results-claim", help="PersistentVolumeClaim for the run directory (head only); "
                                 "without it results live as long as the head pod")
        parser.add_argument("--workers", type=int, default=1, help="worker pods per GPU type (default 1)")
        parser.add_argument("--gpus-per-worker", type=int, default=8, help="GPUs of a worker pod when the study "
                                 "names no cluster.node_types (default 8)")
        parser.add_argument("--cpu-per-gpu", type=int, default=8)
        parser.add_argument("--memory-per-gpu-gib", type=int, default=64)
        parser.add_argument("--head-cpu", default="4")
        parser.add_argument("--head-memory", default="16Gi")
        parser.add_argument("--shm-size", default="16Gi")
        parser.add_argument("--name", help="RayJob name (default: the study's name)")
        parser.add_argument("--namespace")
        parser.add_argument("--secret-name",
                            help="Secret holding the study's ${NAME} references (default <name>-secrets)")
        parser.add_argument("--ray-version", help="rayVersion of the cluster (default: the Ray installed here)")
        parser.add_argument("--ttl-s", type=int, default=3600,
                            help="keep the finished cluster this long (default 3600)")
        parser.add_argument("--deadline-s", type=int, help="activeDeadlineSeconds of the RayJob")
        parser.add_argument("-o", "--output-dir", required=True)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> RayJobCommand:
        return cls(args)

    def run(self) -> int:
        try:
            ctx = build_context(Path(self.args.study), self.args)
        except SpecError as e:
            for line in e.lines:
                print(line, file=sys.stderr)
            return EXIT_USAGE
        except RayJobError as e:
            print(f"{self.args.study}:1: {e}", file=sys.stderr)
            return EXIT_USAGE
        path = render(ctx, Path(self.args.output_dir))
        for w in ctx["warnings"]:
            print(f"note: {w}")
        print(f"wrote {path}: kubectl apply -f {path}")
        return 0
