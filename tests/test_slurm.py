"""The workflow on a real one-node Slurm cluster (tools/local-slurm.sh: slurmctld, slurmd,
slurmdbd, MariaDB and munge from Debian, on localhost, with two fake ``gpu:h200`` devices), driven
through the repository's profile ``profiles/slurm``.

* every effect shard is its own sbatch job with one GPU (sacct's AllocTRES says so), and the
  results equal a local run's;
* after an edit to one neuron only the shards covering it are submitted again;
* faults: ``scancel`` of a running shard (Snakemake resubmits it), SIGKILL of a shard's Python
  process (resubmitted; it resumes from its saved units and recomputes none of them),
  ``scontrol requeue`` of a running shard (preemption: Slurm restarts the same job), and SIGKILL of
  the Snakemake controller followed by the README's recovery steps. Each ends in results equal to
  the uninterrupted run, with no row missing or duplicated.

The tests skip when the cluster cannot be started (not root, no apt-get), and fail instead under
REQUIRE_ALL_TESTS=1 (CI). The cluster is the real thing; the GPUs are not (their device files are
/dev/null), so the jobs compute on the CPU. The fault tests slow each shard's unit down with a
delay (a ``sitecustomize`` hook that sleeps before ``RowCache.save``; see ``UNIT_DELAY_HOOK``)
so that a shard can be hit while it runs; the computation itself is untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import skip_or_fail
from workflow_helpers import (
    REPO,
    SNAKEMAKE,
    UNIT,
    copy_run,
    jobs_of,
    move_neuron,
    snakemake,
    snakemake_command,
    write_workdir,
)

pytestmark = pytest.mark.slurm

LOCAL_SLURM = REPO / "tools" / "local-slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
# what tools/local-slurm.sh sets up: a GPU and a CPU partition, root's default account, and
# GPUs typed h200 both as GRES (gpu:h200:2) and as a node feature (h200)
PARTITION, CPU_PARTITION, ACCOUNT, GPU_TYPE = "gpu", "cpu", "root", "h200"
N_SHARDS = 6  # the tiny_workflow config: 3 layer blocks x 2 prompt chunks
N_BLOCKS = 3  # one aggregate_block job per layer block
C000 = ["L00-01_c000", "L02-03_c000", "L04-05_c000"]  # the shards of the 4-prompt chunk
RESULT_TABLES = ["results/effects/per_prompt.parquet", "results/summary/neurons.parquet",
                 "results/summary/layers.parquet", "results/summary/prompts.parquet"]
RESULT_DOCUMENTS = ["results/summary/neurons.json", "results/labels/neurons.with_effects.json"]
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
RESUMED = re.compile(r"in (\d+) units; (\d+) already done \(resuming\)")


# --- the cluster --------------------------------------------------------------------------------

def _local_slurm(command: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SLURM), command], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster: the one already up (e.g. started by tools/test.sh), else one
    installed, configured and started here (root only) and stopped again at the end."""
    if shutil.which("sinfo") and _local_slurm("status", timeout=60).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        skip_or_fail("Slurm is not running and starting it needs root (tools/local-slurm.sh)")
    if not shutil.which("apt-get") and not Path("/usr/sbin/slurmctld").exists():
        skip_or_fail("Slurm is not installed and apt-get is missing (Debian/Ubuntu only)")
    result = _local_slurm("all")
    if result.returncode != 0:
        skip_or_fail(f"tools/local-slurm.sh all failed:\n{result.stdout}{result.stderr}")
    try:
        yield
    finally:
        _local_slurm("stop", timeout=120)


@pytest.fixture(scope="session")
def test_profile(tmp_path_factory) -> Path:
    """A second profile layered over profiles/slurm (given after it; a later --profile replaces
    whole top-level keys): the test cluster's partition and account, small runtimes and memory
    (still scaled by attempt), one CPU per GPU (2 CPUs, 2 fake GPUs: two jobs at a time), the
    rules' own 2 threads (as in the local reference run), fast status checks. GPU model, retries,
    requeue, status command and everything else come from the repository's profile."""
    profile = yaml.safe_load((PROFILE / "config.v8+.yaml").read_text())
    overlay = {
        "default-resources": {**profile["default-resources"], "slurm_partition": PARTITION,
                              "slurm_account": ACCOUNT, "runtime": "5 * attempt",
                              "mem_mb": "1500 * attempt"},
        "set-resources": {rule: {**resources, "cpus_per_gpu": 1, "runtime": "5 * attempt",
                                 "mem_mb": "1500 * attempt"} if "gpu_model" in resources
                          else resources for rule, resources in profile["set-resources"].items()},
        "set-threads": {rule: 2 for rule in profile["set-threads"]},
        "slurm-init-seconds-before-status-checks": 1,
        "latency-wait": 5,
    }
    assert overlay["set-resources"]["compute_effects"]["gpu_model"] == GPU_TYPE
    assert overlay["set-resources"]["aggregate_effects"] == {"slurm_partition": PARTITION}
    folder = tmp_path_factory.mktemp("slurm-test-profile")
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def feature_profile(test_profile, tmp_path_factory) -> Path:
    """test_profile in the profile's other documented forms: the GPU type by node feature
    (gpu_model "", constraint h200) and the CPU-only jobs in their own partition."""
    overlay = yaml.safe_load((test_profile / "config.v8+.yaml").read_text())
    for resources in overlay["set-resources"].values():
        if "gpu_model" in resources:
            resources.update(gpu_model="", constraint=GPU_TYPE)
        else:
            resources.update(slurm_partition=CPU_PARTITION)
    folder = tmp_path_factory.mktemp("slurm-feature-profile")
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return folder


def slurm_command(workdir: Path, test_profile: Path, *arguments: str) -> list[str]:
    return snakemake_command(workdir, "--profile", str(PROFILE), "--profile", str(test_profile),
                             *arguments)


def run_slurm(workdir: Path, test_profile: Path, *arguments: str, check: bool = True,
              env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return snakemake(workdir, "--profile", str(PROFILE), "--profile", str(test_profile),
                     *arguments, check=check, env=env, timeout=timeout)


def run_id(output: str) -> str:
    match = RUN_ID.search(output)
    assert match, output[-3000:]
    return match.group(1)


def sacct_jobs(name: str, expected: int | None = None, timeout: float = 60) -> list[dict]:
    """The jobs named ``name`` (a run ID) as slurmdbd recorded them: id, state, AllocTRES and the
    comment Snakemake gives each job (``rule_<rule>_wildcards_<wildcards>``). Accounting lags a
    little behind the jobs, so wait until ``expected`` of them are there and finished."""
    start = (datetime.now() - timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%S")
    deadline = time.monotonic() + timeout
    while True:
        output = subprocess.run(
            ["sacct", "-X", "-D", "--parsable2", "--noheader", "--starttime", start, "--name", name,
             "--format=JobIDRaw,State,AllocTRES,Comment,Partition,Constraints"],
            capture_output=True, text=True, check=True).stdout
        rows = [dict(zip(["id", "state", "tres", "comment", "partition", "constraints"],
                         line.split("|")))
                for line in output.splitlines() if line.strip()]
        settled = all(row["state"] not in ("PENDING", "RUNNING", "COMPLETING") for row in rows)
        if (expected is None or len(rows) >= expected) and settled:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct --name {name}: {rows}")
        time.sleep(1)


def rule_of(row: dict) -> tuple[str, str]:
    """(rule, wildcards) from a job's comment: ``rule_compute_effects_wildcards_L00-01_c000``."""
    match = re.fullmatch(r"rule_(\w+?)(?:_wildcards_(.*))?", row["comment"])
    assert match, row
    return match.group(1), match.group(2) or ""


def assert_same_results(workdir: Path, reference: Path) -> None:
    """Every table and document of the run equals the reference's (to 1e-6), none has a
    duplicated or missing row."""
    for name in RESULT_TABLES:
        got, want = pd.read_parquet(workdir / name), pd.read_parquet(reference / name)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6, obj=name)
    per_prompt = pd.read_parquet(workdir / RESULT_TABLES[0])
    assert not per_prompt.duplicated(["prompt_id", "neuron_id"]).any()
    for name in RESULT_DOCUMENTS:
        _assert_close(json.loads((workdir / name).read_text()),
                      json.loads((reference / name).read_text()), name)


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= 1e-6, where
    else:
        assert got == want, where


# --- one complete run through the profile -------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, feature_profile, tiny_model_dir, tmp_path_factory):
    """The tiny_workflow configuration (6 effect shards), run through ``--profile
    profiles/slurm`` in its node-feature and CPU-partition forms (feature_profile; the edit
    test below runs the GRES form), with ``device: auto`` so that the model jobs ask for a GPU, and one
    validation pair instead of 4 (the validation job is the slowest here; the effects and
    summaries compared with tiny_workflow do not depend on it)."""
    workdir = write_workdir(tmp_path_factory.mktemp("slurm-run") / "run", str(tiny_model_dir),
                            device="auto", validation={"pairs": 1},
                            sharding={"layers_per_shard": 2, "prompts_per_chunk": 4})
    output = run_slurm(workdir, feature_profile).stdout
    name = run_id(output)
    return {"workdir": workdir, "output": output, "run_id": name,
            "jobs": sacct_jobs(name, expected=N_SHARDS + 8 + N_BLOCKS)}


def test_effect_shards_are_one_gpu_slurm_jobs(slurm_run):
    jobs = slurm_run["jobs"]
    by_rule: dict[str, list[dict]] = {}
    for row in jobs:
        by_rule.setdefault(rule_of(row)[0], []).append(row)
    # the model jobs went through sbatch with exactly one GPU each, on an h200 node by its
    # feature, in the GPU partition; the CPU steps with none, in the CPU partition; the
    # localrules (input checks, report, all) were not submitted
    assert {rule_of(r)[1] for r in by_rule["compute_effects"]} == {
        f"L{a:02d}-{a + 1:02d}_c{c:03d}" for a in (0, 2, 4) for c in (0, 1)}
    assert len(by_rule["compute_effects"]) == N_SHARDS
    assert len(by_rule["cache_clean_runs"]) == 2 and len(by_rule["validate_sample"]) == 1
    assert len(by_rule["estimate_attribution"]) == 2  # one gradient job per prompt chunk
    for rule in ("compute_effects", "cache_clean_runs", "validate_sample", "estimate_attribution"):
        for row in by_rule[rule]:
            tres = set(row["tres"].split(","))
            assert {"gres/gpu=1", "cpu=1", "node=1"} <= tres and \
                row["partition"] == PARTITION and row["constraints"] == GPU_TYPE, row
    for rule in ("extract_activations", "aggregate_effects", "summarize_attribution"):
        assert len(by_rule[rule]) == 1 and "gres/gpu" not in by_rule[rule][0]["tres"]
        assert by_rule[rule][0]["partition"] == CPU_PARTITION
    assert {rule_of(r)[1] for r in by_rule["aggregate_block"]} == {"L00-01", "L02-03", "L04-05"}
    assert not any("gres/gpu" in row["tres"] for row in by_rule["aggregate_block"])
    assert {row["partition"] for row in by_rule["aggregate_block"]} == {CPU_PARTITION}
    assert set(by_rule) == {"compute_effects", "cache_clean_runs", "validate_sample",
                            "extract_activations", "aggregate_block", "aggregate_effects",
                            "estimate_attribution", "summarize_attribution"}
    assert all(row["state"] == "COMPLETED" for row in jobs), jobs
    # the sbatch request itself (slurmctld keeps finished jobs for MinJobAge = 300 s): one GPU
    # on a node with the h200 feature, --cpus-per-gpu, --requeue (preemption), the partition
    # and account given
    shard_job = by_rule["compute_effects"][0]["id"]
    shown = subprocess.run(["scontrol", "show", "job", shard_job], capture_output=True,
                           text=True, check=True).stdout
    for field in ("TresPerJob=gres:gpu:1", "CpusPerTres=gres:gpu:1", "Requeue=1",
                  f"Partition={PARTITION}", f"Account={ACCOUNT}"):
        assert field in shown.split(), (field, shown)
    # and Snakemake says the same: one submission per shard
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S+/rule_compute_"
                           r"effects/(\S+)/\d+\.log\)", slurm_run["output"])
    assert sorted(shard for _, shard in submitted) == sorted(
        rule_of(r)[1] for r in by_rule["compute_effects"])


def test_results_equal_a_local_run(slurm_run, tiny_workflow):
    assert_same_results(slurm_run["workdir"], tiny_workflow[0])
    validation = json.loads((slurm_run["workdir"] / "results/validation/summary.json").read_text())
    assert validation["passed"] is True
    assert (slurm_run["workdir"] / "results/report/report.html").stat().st_size > 0


def test_profile_resolves_by_name_from_the_repository_root(tmp_path, demo_model_path):
    """``snakemake --profile slurm`` from the root finds ./slurm -> profiles/slurm (a dry run).

    Run in a scratch copy of the repository's workflow files, so that it plans the whole job
    whatever the repository's own results/ and .snakemake/ hold, and leaves them as they are."""
    assert (REPO / "slurm").resolve() == PROFILE.resolve()
    root = tmp_path / "repository"
    root.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, root / name)
    (root / "slurm").symlink_to("profiles/slurm")
    result = subprocess.run([*SNAKEMAKE, "--profile", "slurm", "--dry-run", "--quiet", "rules",
                             "--config", f"model={demo_model_path}"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compute_effects" in result.stdout + result.stderr
    assert not (root / "results").exists()


def test_edit_reruns_only_the_affected_shards(slurm_run, test_profile, tmp_path):
    workdir = copy_run(slurm_run["workdir"], tmp_path / "run")
    before = pd.read_parquet(workdir / RESULT_TABLES[0])
    assert move_neuron(workdir, "L3/N10", 60) == "L3/N60"

    # what would rerun (README): one dry run lists exactly the stale shards, with their reason
    dry = run_slurm(workdir, test_profile, "--dry-run").stdout
    assert jobs_of(dry, "compute_effects") == {"L02-03_c000", "L02-03_c001"}, dry
    assert not jobs_of(dry, "cache_clean_runs")
    assert dry.count("reason: Params have changed since last execution") == 2
    output = run_slurm(workdir, test_profile).stdout
    assert jobs_of(output, "compute_effects") == {"L02-03_c000", "L02-03_c001"}
    jobs = sacct_jobs(run_id(output), expected=6)
    submitted = sorted(rule_of(row) for row in jobs)
    # the two shards of layer block L02-03, then that block's aggregation (the other blocks'
    # parts are kept), the final aggregation, the AtP comparison and the validation that read
    # them (the gradients themselves do not depend on the neuron list)
    # the GRES form of the profile (test_profile): the shards asked for gpu:h200, and every
    # job went to the one partition
    for row in jobs:
        assert row["partition"] == PARTITION, row
        if rule_of(row)[0] == "compute_effects":
            assert f"gres/gpu:{GPU_TYPE}=1" in row["tres"].split(","), row
    assert submitted == [("aggregate_block", "L02-03"), ("aggregate_effects", ""),
                         ("compute_effects", "L02-03_c000"),
                         ("compute_effects", "L02-03_c001"), ("summarize_attribution", ""),
                         ("validate_sample", "")], submitted
    after = pd.read_parquet(workdir / RESULT_TABLES[0])
    assert len(after) == len(before) and not after.duplicated(["prompt_id", "neuron_id"]).any()
    assert "L3/N60" in set(after["neuron_id"]) and "L3/N10" not in set(after["neuron_id"])
    pd.testing.assert_frame_equal(
        before[~before["neuron_id"].eq("L3/N10")].reset_index(drop=True),
        after[~after["neuron_id"].eq("L3/N60")].reset_index(drop=True), rtol=0, atol=1e-6)
    assert "Nothing to be done" in run_slurm(workdir, test_profile, "--dry-run").stdout


# --- faults -------------------------------------------------------------------------------------

# Put on PYTHONPATH (the controller's environment reaches every job: sbatch --export=ALL), it
# makes RowCache.save sleep NEURON_EFFECTS_TEST_UNIT_DELAY seconds before saving a unit.
UNIT_DELAY_HOOK = '''
import importlib.abc, importlib.util, os, sys, time

_DELAY = float(os.environ.get("NEURON_EFFECTS_TEST_UNIT_DELAY") or 0)


class _SlowUnits(importlib.abc.MetaPathFinder):
    busy = False

    def find_spec(self, name, path, target=None):
        if name != "neuron_effects.cache" or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            save = module.RowCache.save

            def slow_save(row_cache, rows, tables, made_by=""):
                time.sleep(_DELAY)
                return save(row_cache, rows, tables, made_by)

            module.RowCache.save = slow_save

        spec.loader.exec_module = exec_module
        return spec


if _DELAY > 0:
    sys.meta_path.insert(0, _SlowUnits())
'''
UNIT_DELAY_S = 3.0


@pytest.fixture(scope="module")
def slow_units(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("slow-units")
    (folder / "sitecustomize.py").write_text(UNIT_DELAY_HOOK)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "NEURON_EFFECTS_TEST_UNIT_DELAY": str(UNIT_DELAY_S)}


def _fault_workdir(slurm_run, destination: Path) -> Path:
    """A copy of the finished run without the outputs of the 4-prompt chunk's three shards
    (4 units each), the cached effect rows, the blocks' aggregation parts and the aggregated
    table, so that the aggregation (the target) reruns and computes those shards again."""
    workdir = copy_run(slurm_run["workdir"], destination)
    for shard in C000:
        (workdir / f"results/effects/shards/{shard}.parquet").unlink()
    shutil.rmtree(workdir / "results/cache/effects")
    shutil.rmtree(workdir / "results/aggregate")
    (workdir / RESULT_TABLES[0]).unlink()
    return workdir


class Controller:
    """The Snakemake controller in the background (its own session), output to a file."""

    def __init__(self, command: list[str], workdir: Path, env: dict[str, str], log: Path):
        self.workdir, self.log = workdir, log
        with log.open("w") as handle:
            self.process = subprocess.Popen(command, cwd=workdir, stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **env})

    def output(self) -> str:
        return self.log.read_text()

    def run_id(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not (match := RUN_ID.search(self.output())):
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        return match.group(1)

    def wait(self, timeout: float = 420) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"controller still running after {timeout} s:\n"
                                 f"{self.output()[-6000:]}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def running_shards(name: str) -> dict[str, str]:
    """shard -> Slurm job id of the run's compute_effects jobs that are RUNNING now."""
    output = subprocess.run(["squeue", "-h", "--name", name, "-t", "RUNNING", "-o", "%i|%k"],
                            capture_output=True, text=True, check=True).stdout
    shards = {}
    for line in output.splitlines():
        job, comment = line.split("|", 1)
        if comment.startswith("rule_compute_effects_wildcards_"):
            shards[comment.removeprefix("rule_compute_effects_wildcards_")] = job
    return shards


def saved_units(workdir: Path, shard: str) -> set[str]:
    """The units of ``shard`` saved in the row cache: a unit is done when its entry's manifest
    exists (written last), which names the job and unit that made it."""
    made_by = [json.loads(path.read_text()).get("made_by", "")
               for path in (workdir / "results/cache/effects").glob("*/*.json")]
    return {label.split(" unit ", 1)[1] for label in made_by if label.startswith(f"{shard} unit ")}


def wait_for_shard(controller: Controller, name: str, *, exclude=(), min_units: int = 1,
                   baseline: dict[str, int] | None = None, timeout: float = 240
                   ) -> tuple[str, str]:
    """A running shard (not in ``exclude``) whose job has saved at least ``min_units`` units
    (beyond ``baseline[shard]``) and still has some to do: (shard, Slurm job id)."""
    deadline = time.monotonic() + timeout
    while True:
        assert controller.process.poll() is None, controller.output()[-6000:]
        assert time.monotonic() < deadline, controller.output()[-6000:]
        for shard, job in running_shards(name).items():
            if shard in exclude:
                continue
            done = len(saved_units(controller.workdir, shard))
            if min_units <= done - (baseline or {}).get(shard, 0) and done < 4:
                return shard, job
        time.sleep(0.1)


def script_pid(job: str) -> int:
    """The PID of the Python process that runs the shard's script inside Slurm job ``job``."""
    output = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True,
                            check=True).stdout
    for line in output.splitlines()[1:]:
        pid = int(line.split()[0])
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "compute_effects.py" in command and "snakemake" not in command.split()[0]:
            return pid
    raise AssertionError(f"no script process in job {job}:\n{output}")


def final_log(workdir: Path, shard: str) -> str:
    """The shard's log as its last (successful) attempt wrote it."""
    return (workdir / f"logs/compute_effects/{shard}.log").read_text()


def submissions(output: str, shard: str) -> list[str]:
    return re.findall(rf"submitted with SLURM jobid (\d+) \(log: \S+/rule_compute_effects/"
                      rf"{shard}/\d+\.log\)", output)


def test_scancel_sigkill_and_requeue_of_running_shards(slurm_run, test_profile, slow_units,
                                                       tmp_path):
    workdir = _fault_workdir(slurm_run, tmp_path / "run")
    controller = Controller(slurm_command(workdir, test_profile, "aggregate_effects"), workdir,
                            slow_units, tmp_path / "controller.out")
    try:
        name = controller.run_id()
        # 1. scancel one running shard: Snakemake sees CANCELLED and submits it again
        cancelled, cancelled_job = wait_for_shard(controller, name)
        subprocess.run(["scancel", cancelled_job], check=True)
        # 2. SIGKILL the Python process of another running shard: the job fails, is
        # resubmitted, and the new job resumes from the units saved before the kill
        killed, killed_job = wait_for_shard(controller, name, exclude={cancelled})
        os.kill(script_pid(killed_job), signal.SIGKILL)
        done_at_kill = saved_units(workdir, killed)
        # 3. requeue the third shard while it runs (what preemption does): Slurm restarts the
        # same job, Snakemake keeps waiting for it
        requeued, requeued_job = wait_for_shard(controller, name, exclude={cancelled, killed})
        subprocess.run(["scontrol", "requeue", requeued_job], check=True)
        assert controller.wait() == 0, controller.output()[-8000:]
    finally:
        controller.kill()
    output = controller.output()
    assert {cancelled, killed, requeued} == set(C000)

    # what Slurm and Snakemake saw
    assert f"SLURM-job '{cancelled_job}' failed, SLURM status is: 'CANCELLED'" in output
    assert f"SLURM-job '{killed_job}' failed, SLURM status is: 'FAILED'" in output
    assert len(submissions(output, cancelled)) == 2 and len(submissions(output, killed)) == 2
    assert submissions(output, requeued) == [requeued_job]  # not resubmitted: requeued by Slurm
    # 5 shard submissions, the 3 blocks' aggregations (each block lost a shard), the final step
    jobs = {row["id"]: row for row in sacct_jobs(name, expected=6 + N_BLOCKS)}
    states = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", requeued_job,
                             "--format=State"], capture_output=True, text=True).stdout.split()
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    assert jobs[cancelled_job]["state"].startswith("CANCELLED")
    assert jobs[killed_job]["state"] == "FAILED"

    # the killed shard resumed from its saved units and recomputed none of them
    all_units = {f"n000_p{p:05d}" for p in range(4)}
    assert 1 <= len(done_at_kill) < 4 and done_at_kill < all_units
    log = final_log(workdir, killed)
    assert f"in 4 units; {len(done_at_kill)} already done (resuming)" in log
    recomputed = UNIT.findall(log)
    assert sorted(recomputed) == sorted(all_units - done_at_kill)
    # the cancelled and requeued shards resumed too (at least the unit seen before the fault)
    for shard in (cancelled, requeued):
        resumed = RESUMED.search(final_log(workdir, shard))
        assert resumed and int(resumed.group(2)) >= 1, final_log(workdir, shard)
        assert len(UNIT.findall(final_log(workdir, shard))) == 4 - int(resumed.group(2))
    assert_same_results(workdir, slurm_run["workdir"])


def test_killed_controller_recovers_with_the_documented_commands(slurm_run, test_profile,
                                                                 slow_units, tmp_path):
    workdir = _fault_workdir(slurm_run, tmp_path / "run")
    command = slurm_command(workdir, test_profile, "aggregate_effects")
    controller = Controller(command, workdir, slow_units, tmp_path / "controller.out")
    try:
        name = controller.run_id()
        first, _ = wait_for_shard(controller, name)
        os.kill(controller.process.pid, signal.SIGKILL)  # the login node dies
        controller.process.wait()
    finally:
        controller.kill()
    progress = {shard: saved_units(workdir, shard) for shard in C000}
    assert progress[first]
    assert (workdir / ".snakemake/locks").exists() and any((workdir / ".snakemake/locks").iterdir())

    # the README's recovery: find the dead run's id in its log, cancel its jobs (named by that
    # id), unlock, and rerun the same command
    logs = sorted((workdir / ".snakemake/log").glob("*.snakemake.log"))
    ids = RUN_ID.findall("".join(p.read_text() for p in logs))
    assert ids[-1] == name and name.startswith("neuron_effects_")
    orphans = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    orphan_ids = [line.split()[0] for line in orphans if line.strip() and line.split()[1] == name]
    assert orphan_ids  # the jobs outlived their controller
    subprocess.run(["scancel", "--name", name], check=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "--name", name], capture_output=True, text=True,
                         check=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    locked = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    run_slurm(workdir, test_profile, "--unlock")
    progress = {shard: saved_units(workdir, shard) for shard in C000}  # after the orphans died
    output = run_slurm(workdir, test_profile, "aggregate_effects").stdout
    for shard in C000:
        log = final_log(workdir, shard)
        assert f"in 4 units; {len(progress[shard])} already done (resuming)" in log, log
        assert not set(UNIT.findall(log)) & progress[shard]
    assert sum(len(units) for units in progress.values()) >= 1
    assert jobs_of(output, "compute_effects") == set(C000)
    assert_same_results(workdir, slurm_run["workdir"])
