"""A GKE JobSet manifest: one replicated job per slice, one pod per TPU VM host.

Follows what xpk generates: hostNetwork + ClusterFirstWithHostNet (TPU hosts talk over the
node network), exclusive placement per node pool, the gke-tpu-topology label from GKE's
table, and xpk's failure policy: a pod that exits with a restart code of modxla.errors
(stopped after saving, hung step) fails its Job by backoff and the JobSet restarts it (the
run resumes); any other non-zero exit fails the Job by its podFailurePolicy and the JobSet
fails with it, since a restart would repeat the crash. The image holds the project at
--commit and its pinned dependencies (Dockerfile at the repository root), so a pod start
installs nothing and needs no egress.
"""

from __future__ import annotations

import json
import shlex

from launch import worker
from launch.slices import GKE_ACCEL, LaunchError, Slice, check_multislice
from modxla.errors import EXIT_BAD_INPUT, RESTART

IMAGE_CODE = "/workspace/modxla"  # the Dockerfile's copy of the project, installed -e
IMAGE_COMMIT = f"{IMAGE_CODE}/COMMIT"  # written at build time: docker build --build-arg COMMIT=


def container_command(a) -> str:
    """Run the image's code, refusing an image built from another commit (exit 2: the
    podFailurePolicy fails the JobSet instead of restarting it)."""
    return (
        f"set -e; cd {IMAGE_CODE}; got=$(cat {IMAGE_COMMIT} 2>/dev/null || echo none); "
        f'if [ "$got" != {shlex.quote(a.commit)} ]; then echo "error: image {a.image} holds '
        f'commit $got, not {a.commit}: rebuild it with --build-arg COMMIT={a.commit}" >&2; '
        f"exit {EXIT_BAD_INPUT}; fi; exec {worker.train_command(a, python='python3')}"
    )


def jobset(a, sl: Slice) -> str:
    if not a.image:
        raise LaunchError("jobset: --image is required (build it with the repository's Dockerfile)")
    check_multislice(sl, a.slices)
    topology = sl.gke_topology()
    env = ""
    if a.slices > 1:  # the slice id and coordinator only the JobSet knows
        env = f"""
              env:
              - name: MEGASCALE_NUM_SLICES
                value: "{a.slices}"
              - name: MEGASCALE_SLICE_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['jobset.sigs.k8s.io/job-index']
              - name: MEGASCALE_COORDINATOR_ADDRESS
                value: "{a.name}-slice-0-0.{a.name}\""""
    return f"""apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {a.name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: {a.retries}
    rules:
    - action: FailJobSet
      onJobFailureReasons:
      - PodFailurePolicy
  replicatedJobs:
  - name: slice
    replicas: {a.slices}
    template:
      spec:
        parallelism: {sl.hosts}
        completions: {sl.hosts}
        backoffLimit: 0
        podFailurePolicy:
          rules:
          - action: FailJob
            onExitCodes:
              containerName: train
              operator: NotIn
              values: [{", ".join(str(c) for c in sorted(RESTART))}]
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: {a.grace}
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: {GKE_ACCEL[sl.family]}
              cloud.google.com/gke-tpu-topology: {topology}
            containers:
            - name: train
              image: {a.image}
              command: ["bash", "-c", {json.dumps(container_command(a))}]{env}
              resources:
                limits:
                  google.com/tpu: {sl.chips // sl.hosts}
"""
