r"""Training on a GKE TPU slice: a JobSet manifest (kubectl) or an XPK command line.

  python -m launch.gke --name mmr-s1 --accelerator v4-32 --image us-docker.pkg.dev/P/R/mmr:latest \
      --config configs/demo.py:stage=1 --workdir gs://BUCKET/mmr/s1 [--config.key=value ...] \
      [--out mmr-s1.yaml] [--submit] [--dry-run]
  python -m launch.gke --xpk --cluster my-cluster ...same flags...     # XPK instead of a manifest

Without --submit the manifest goes to --out (or stdout); --submit also runs `kubectl apply -f`;
--dry-run prints the manifest and the kubectl command and runs nothing.

One pod per TPU VM host: a v4-32 is 4 hosts x 4 chips, so the slice's Job has parallelism =
completions = 4, each pod asking for `google.com/tpu: 4` on nodes labelled
`cloud.google.com/gke-tpu-accelerator: tpu-v4-podslice` and `cloud.google.com/gke-tpu-topology: 2x2x4`.
GKE's TPU webhook gives each pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, from which
`jax.distributed.initialize()` finds its peers; the JobSet annotation
`alpha.jobset.sigs.k8s.io/exclusive-topology` keeps one slice's pods on one node pool. For
--num_slices N the replicated job gets N replicas and GKE adds the MEGASCALE_* variables
(coordinator, slice id, slice count) that join the slices over DCN.

The image must contain this repo (working directory --container_dir, default /app) with mmr_jax
and jax[tpu] installed; pods need write access to the gs:// workdir (Workload Identity:
--service_account). backoffLimit 0 and maxRestarts --max_restarts: any failed pod restarts the whole
JobSet, which resumes from the workdir's last checkpoint.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from launch import common


def jobset_manifest(*, name: str, slice_: common.TpuSlice, image: str, command: Sequence[str], num_slices: int = 1,
                    env: dict[str, str] | None = None, container_dir: str = "/app", max_restarts: int = 0,
                    service_account: str | None = None, spot: bool = False, namespace: str | None = None,
                    secret_refs: dict[str, tuple[str, str]] | None = None, env_from_secret: str | None = None) -> dict:
  """Returns the JobSet (jobset.x-k8s.io/v1alpha2) running `command` on every host of `num_slices` slices.

  Secrets are referenced, never inlined: `secret_refs` {NAME: (secret, key)} become valueFrom.secretKeyRef
  entries, `env_from_secret` an envFrom of every key of that Kubernetes Secret.
  """
  if slice_.gke_accelerator is None:
    raise common.LaunchError(f"--accelerator {slice_.accelerator_type}: {slice_.generation} is not offered on GKE")
  if num_slices > 1 and slice_.hosts == 1:
    raise common.LaunchError(f"--num_slices {num_slices}: multi-slice needs multi-host slices; "
                             f"{slice_.accelerator_type} is a single host")
  node_selector = {"cloud.google.com/gke-tpu-accelerator": slice_.gke_accelerator,
                   "cloud.google.com/gke-tpu-topology": slice_.topology}
  if spot:
    node_selector["cloud.google.com/gke-spot"] = "true"
  container: dict[str, Any] = {
      "name": "mmr",
      "image": image,
      "workingDir": container_dir,
      "command": list(command),
      # 8471: TPU runtime between hosts of a slice; 8080: megascale (DCN) between slices.
      "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
      "resources": {"limits": {"google.com/tpu": slice_.chips_per_host}},
  }
  entries = [{"name": k, "value": str(v)} for k, v in (env or {}).items()]
  entries += [{"name": k, "valueFrom": {"secretKeyRef": {"name": sec, "key": key}}}
              for k, (sec, key) in (secret_refs or {}).items()]
  if entries:
    container["env"] = entries
  if env_from_secret:
    container["envFrom"] = [{"secretRef": {"name": env_from_secret}}]
  pod_spec: dict[str, Any] = {
      # Host networking: the TPU runtime's inter-host traffic bypasses the pod overlay network.
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      "restartPolicy": "Never",
      "nodeSelector": node_selector,
      "containers": [container],
  }
  if service_account:
    pod_spec["serviceAccountName"] = service_account
  metadata: dict[str, Any] = {
      "name": name,
      "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
  }
  if namespace:
    metadata["namespace"] = namespace
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": metadata,
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          "replicatedJobs": [{
              "name": "slice",
              "replicas": num_slices,
              "template": {"spec": {
                  "parallelism": slice_.hosts,
                  "completions": slice_.hosts,
                  "backoffLimit": 0,
                  "template": {"spec": pod_spec},
              }},
          }],
      },
  }


def apply_stdin_command(text: str) -> str:
  """Returns shell text piping `text` into `kubectl apply -f -` as one quoted word (no heredoc to end early)."""
  return f"printf '%s' {shlex.quote(text)} | kubectl apply -f -"


def manifest_yaml(manifest: dict) -> str:
  """Returns the manifest as YAML (key order kept, so it reads like the Kubernetes docs)."""
  return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)


def xpk_command(*, name: str, cluster: str, slice_: common.TpuSlice, image: str, command: Sequence[str],
                num_slices: int, env: dict[str, str], zone: str | None, project: str | None,
                container_dir: str, env_file: str | None = None) -> list[str]:
  """Returns the `xpk workload create` argv for the same job (XPK builds the JobSet itself)."""
  cmd = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}",
         f"--tpu-type={slice_.accelerator_type}", f"--num-slices={num_slices}", f"--docker-image={image}",
         f"--command=cd {shlex.quote(container_dir)} && {shlex.join(command)}"]
  for k, v in env.items():
    cmd.append(f"--env={k}={v}")
  if env_file:
    cmd.append(f"--env-file={env_file}")
  if zone:
    cmd.append(f"--zone={zone}")
  if project:
    cmd.append(f"--project={project}")
  return cmd


# --------------------------------------------------------------------------- sweep backend interface


def add_backend_args(parser: argparse.ArgumentParser):
  """Adds the flags a GKE job needs (used by this CLI and by launch.sweep --backend gke)."""
  parser.add_argument("--accelerator", required=True, help="TPU type, e.g. v4-32, v5p-64, v5litepod-16, v6e-16")
  parser.add_argument("--topology", default=None, help="override the default topology, e.g. 2x2x4")
  parser.add_argument("--image", required=True, help="container image holding this repo with jax[tpu]")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--env", action="append", metavar="NAME=VALUE", help="container environment (repeatable)")
  common.add_secret_args(parser)
  parser.add_argument("--k8s_secret", action="append", default=[], metavar="NAME=SECRET:KEY",
                      help="env var NAME from key KEY of Kubernetes Secret SECRET (valueFrom.secretKeyRef; repeatable)")
  parser.add_argument("--container_dir", default="/app", help="repo directory inside the image")
  parser.add_argument("--python", default="python", help="interpreter inside the image")
  parser.add_argument("--max_restarts", type=int, default=0, help="JobSet restarts after a failure")
  parser.add_argument("--service_account", default=None, help="Kubernetes service account (Workload Identity)")
  parser.add_argument("--namespace", default=None)
  parser.add_argument("--spot", action="store_true", help="schedule on spot TPU node pools")
  parser.add_argument("--allow_local_workdir", action="store_true",
                      help="accept a non-bucket --workdir (a volume every pod mounts)")
  parser.add_argument("--aot_check", action="store_true",
                      help="first compile the train step for --accelerator on this machine (tools/aot_compile.py) "
                           "and refuse to submit when it does not fit the chips' HBM")
  parser.add_argument("--xpk", action="store_true", help="emit an `xpk workload create` command instead")
  parser.add_argument("--cluster", default=None, help="GKE cluster (for --xpk)")
  parser.add_argument("--zone", default=None, help="cluster zone (for --xpk)")
  parser.add_argument("--project", default=None, help="project (for --xpk)")


def _train_argv(args, config: str, workdir: str, overrides) -> list[str]:
  common.require_bucket(workdir, args.allow_local_workdir)
  return common.train_command(common.repo_relative_config(config), workdir, overrides, python=args.python,
                              module=args.train_module, extra=common.train_extra(args))


def secret_refs(args) -> dict[str, tuple[str, str]]:
  """Returns {NAME: (secret, key)} from --k8s_secret NAME=SECRET:KEY flags."""
  out = {}
  for item in args.k8s_secret or ():
    m = re.fullmatch(r"([A-Za-z_]\w*)=([a-z0-9][a-z0-9.-]*):([-._A-Za-z0-9]+)", item)
    if not m:
      raise common.LaunchError(f"--k8s_secret {item!r}: expected NAME=SECRET:KEY, e.g. HF_TOKEN=hf:token")
    out[m.group(1)] = (m.group(2), m.group(3))
  return out


def env_secret_name(name: str) -> str:
  """Returns the name of the Kubernetes Secret that --env_file becomes for job `name`."""
  return common.k8s_name(f"{name}-env", max_len=63)


def _plain_env(args) -> dict[str, str]:
  plain, secret = common.split_secret_env(args)
  if secret:
    raise common.LaunchError(f"--env {sorted(secret)[0]}=... is a secret and would be written into the manifest in "
                             "plain text; use --k8s_secret NAME=SECRET:KEY or --env_file PATH")
  return plain


def job_manifest(args, *, name: str, config: str, workdir: str, overrides) -> dict:
  """Returns the JobSet of one job from parsed backend args."""
  if args.env_file:
    common.read_env_file(args.env_file)  # read at submit time: a missing or malformed file fails here
  return jobset_manifest(name=common.k8s_name(name),
                         slice_=common.tpu_slice(args.accelerator, args.topology), image=args.image,
                         command=_train_argv(args, config, workdir, overrides), num_slices=args.num_slices,
                         env={"MMR_DISTRIBUTED": "auto", **_plain_env(args)},
                         secret_refs=secret_refs(args),
                         env_from_secret=env_secret_name(common.k8s_name(name)) if args.env_file else None,
                         container_dir=args.container_dir,
                         max_restarts=args.max_restarts, service_account=args.service_account, spot=args.spot,
                         namespace=args.namespace)


def job_commands(args, *, name: str, config: str, workdir: str, overrides) -> list[common.Command]:
  """Returns the command submitting one job: `kubectl apply` of a heredoc manifest, or `xpk workload create`."""
  name = common.k8s_name(name)
  if args.xpk:
    if not args.cluster:
      raise common.LaunchError("--xpk needs --cluster")
    return [xpk_command(name=name, cluster=args.cluster, slice_=common.tpu_slice(args.accelerator, args.topology),
                        image=args.image, command=_train_argv(args, config, workdir, overrides),
                        num_slices=args.num_slices, env=common.parse_env(args.env), zone=args.zone,
                        project=args.project, container_dir=args.container_dir, env_file=args.env_file)]
  text = manifest_yaml(job_manifest(args, name=name, config=config, workdir=workdir, overrides=overrides))
  return [*env_secret_commands(args, name), apply_stdin_command(text)]


def env_secret_commands(args, name: str) -> list[common.Command]:
  """Returns the kubectl command turning --env_file into the job's Secret (kubectl reads the file; nothing inlined)."""
  if not args.env_file:
    return []
  ns = [f"--namespace={args.namespace}"] if args.namespace else []
  create = ["kubectl", "create", "secret", "generic", env_secret_name(name), f"--from-env-file={args.env_file}",
            *ns, "--dry-run=client", "-o", "yaml"]
  return [f"{shlex.join(create)} | kubectl apply -f -"]


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.make_parser(__doc__, prog="python -m launch.gke")
  common.add_train_args(parser, workdir_help="run directory on a bucket, e.g. gs://BUCKET/mmr/run1")
  add_backend_args(parser)
  parser.add_argument("--name", required=True, help="JobSet / workload name (lowercase letters, digits, '-')")
  parser.add_argument("--out", default=None, help="write the manifest here (default: stdout)")
  parser.add_argument("--submit", action="store_true", help="kubectl apply (or run xpk) after writing")
  args = common.parse_with_overrides(parser, argv)
  if common.k8s_name(args.name) != args.name:
    parser.error(f"--name {args.name!r} is not a Kubernetes name (lowercase letters, digits and '-', starting with a "
                 f"letter, at most 40 characters so pod names fit); e.g. {common.k8s_name(args.name)!r}")
  # Built here first: a mistyped key fails now, not in every pod of the slice.
  common.build_config(args.config, args.overrides)
  if args.aot_check:
    common.aot_check(args.config, args.overrides, args.accelerator, topology=args.topology,
                     num_slices=args.num_slices)
  if args.xpk:
    cmds = job_commands(args, name=args.name, config=args.config, workdir=args.workdir, overrides=args.overrides)
    secrets = common.split_secret_env(args)[1].values()
    return common.run_commands(cmds, dry_run=args.dry_run or not args.submit, secrets=secrets)
  text = manifest_yaml(job_manifest(args, name=args.name, config=args.config, workdir=args.workdir,
                                    overrides=args.overrides))
  apply = ["kubectl", "apply", "-f", args.out or "-"]
  if args.dry_run:
    sys.stdout.write(text)
    if args.submit:
      print("---\n# would run: " + (shlex.join(apply) if args.out else "kubectl apply -f - (the manifest above)"))
    return 0
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
  elif not args.submit:
    sys.stdout.write(text)
  if not args.submit:
    return 0
  pre = env_secret_commands(args, args.name)
  if args.out:
    return common.run_commands([*pre, apply], dry_run=False)
  return common.run_commands([*pre, apply_stdin_command(text)], dry_run=False)


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
