"""A GKE JobSet manifest: one replicated job per slice, one pod per TPU VM host.

Follows what xpk generates: hostNetwork + ClusterFirstWithHostNet (TPU hosts talk over the
node network), exclusive placement per node pool, the gke-tpu-topology label from GKE's
table. The image holds the pinned dependencies (Dockerfile at the repository root); the
container checks the project out at --commit. Restarted pods resume by themselves
(checkpoint.resume=auto).
"""

from __future__ import annotations

import json
import shlex

from launch import worker
from launch.slices import GKE_ACCEL, LaunchError, Slice, check_multislice


def container_command(a) -> str:
    return (
        f"set -e; git clone -q {shlex.quote(a.repo)} /workspace/modxla && cd /workspace/modxla "
        f"&& git checkout -q {a.commit} && python3 -m pip install -q --no-deps -e . && "
        f"exec {worker.train_command(a)}"
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
  replicatedJobs:
  - name: slice
    replicas: {a.slices}
    template:
      spec:
        parallelism: {sl.hosts}
        completions: {sl.hosts}
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
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
