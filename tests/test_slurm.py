"""SLURM with its variables faked: ranks from SLURM, USR1 -> save + requeue, resume, log, offline tasks.

The job script ``scripts/slurm/fit.sbatch`` runs here with ``srun`` and ``scontrol`` replaced by stubs
that record what they were given; the Python side (what each task does on USR1, which ranks SLURM's
variables give) runs in this process with the variables set.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess

import pytest
import torch

from kangaroo_lit.cli import main, run_lightning
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = REPO_ROOT / "scripts" / "slurm" / "fit.sbatch"
DOLLY_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "dolly-tiny.jsonl"
JOB_ID = "4242"


def sbatch_directives() -> dict[str, str]:
    found = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            found[key] = value
    return found


def slurm_env(monkeypatch, ntasks=1, ntasks_per_node=1, nnodes=1, procid=0, localid=0, nodeid=0,
              nodelist="localhost"):
    """The variables srun sets for one task (what Lightning's SLURMEnvironment reads)."""
    values = {"SLURM_NTASKS": ntasks, "SLURM_NTASKS_PER_NODE": ntasks_per_node, "SLURM_NNODES": nnodes,
              "SLURM_PROCID": procid, "SLURM_LOCALID": localid, "SLURM_NODEID": nodeid,
              "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "kangaroo-lit", "SLURM_NODELIST": nodelist}
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def stub(path, body: str):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fit_args(root, model_dir, *extra):
    return ["--config", str(REPO_ROOT / "configs/tiny.yaml"), "--model.base_model", str(model_dir),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--data.data_path", str(DOLLY_FIXTURE), "--data.batch_size", "2",
            "--data.max_length", "64", "--data.cache_dir", str(root / "cache"), *extra]


# --------------------------------------------------------------------------------------------------
# The job script's directives and command lines


def test_directives_ask_for_usr1_to_the_tasks_requeue_and_an_appended_log():
    d = sbatch_directives()
    assert d["signal"] == "USR1@90"  # no "B:": the training tasks get it, not the batch shell
    assert "requeue" in d and d["open-mode"] == "append"
    assert "%j" in d["output"] and not re.search(r"%[As]", d["output"])  # one file per job id, kept on requeue
    assert d["ntasks-per-node"] == d["gpus-per-node"]  # one task per GPU


@pytest.fixture
def cluster(tmp_path):
    """Stubs for srun (records its options and its tasks' environment, then runs the task command),
    scontrol (records its arguments) and kangaroo-lit (records its arguments, exits with $FAKE_EXIT)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    log.mkdir()
    stub(bin_dir / "srun", 'start=${SLURM_RESTART_COUNT:-0}\n'
                           'printf "%s\\n" "$@" > "$FAKE_LOG/srun.$start"\n'
                           'env > "$FAKE_LOG/env.$start"\n'
                           'while [ "${1#--}" != "$1" ]; do shift; done  # srun\'s own options\n'
                           'exec "$@"\n')
    stub(bin_dir / "scontrol", 'echo "$@" >> "$FAKE_LOG/scontrol"\n')
    stub(bin_dir / "kangaroo-lit", 'printf "%s\\n" "$@" > "$FAKE_LOG/fit.${SLURM_RESTART_COUNT:-0}"\n'
                                   'exit "${FAKE_EXIT:-0}"\n')

    def submit(restart: int, fake_exit: int, **extra):
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ROOT": str(tmp_path / "run"), "KANGAROO": "kangaroo-lit",
               "FAKE_LOG": str(log), "FAKE_EXIT": str(fake_exit), "SLURM_JOB_ID": JOB_ID,
               "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_RESTART_COUNT": str(restart),
               "SLURM_JOB_NODELIST": "gpu[01-02]", **extra}
        proc = subprocess.run(["bash", str(SCRIPT), "--trainer.max_epochs", "5"], capture_output=True, text=True,
                              env=env, cwd=REPO_ROOT, timeout=60)
        # SLURM appends every start's output to the same file (--open-mode=append, %j kept on requeue)
        with (tmp_path / f"slurm-kangaroo-lit-{JOB_ID}.out").open("a") as out:
            out.write(proc.stdout + proc.stderr)
        return proc

    def calls(name: str) -> list[str]:
        path = log / name
        return path.read_text().splitlines() if path.exists() else []

    return submit, calls, tmp_path


@pytest.mark.parametrize("layout", ["file", "deepspeed-directory"])
def test_usr1_exit_requeues_and_the_next_start_resumes_from_last_ckpt(cluster, layout):
    submit, calls, tmp_path = cluster
    first = submit(restart=0, fake_exit=128 + signal.SIGUSR1)  # the tasks saved and stopped for the time limit
    assert first.returncode == 0, first.stderr
    assert calls("scontrol") == [f"requeue {JOB_ID}"]
    fit = calls("fit.0")
    assert fit[:5] == ["fit", "--config", "configs/sgp.yaml", "--config", "configs/deepspeed-zero2.yaml"]
    assert "--ckpt_path" not in fit and fit[-2:] == ["--trainer.max_epochs", "5"]
    # devices and nodes from the allocation; the run directory fixed across requeues
    joined = " ".join(fit)
    assert "--trainer.devices 4 --trainer.num_nodes 2" in joined
    assert f"--trainer.default_root_dir {tmp_path / 'run'}" in joined
    assert calls("srun.0")[0] == "--export=ALL"  # every task gets this shell's environment

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    if layout == "file":
        last.write_bytes(b"checkpoint")
    else:
        (last / "checkpoint").mkdir(parents=True)  # KangarooDeepSpeedStrategy writes a directory
    second = submit(restart=1, fake_exit=0)
    assert second.returncode == 0, second.stderr
    fit = calls("fit.1")
    assert fit[fit.index("--ckpt_path") + 1] == str(last)
    assert calls("scontrol") == [f"requeue {JOB_ID}"]  # not requeued again: training finished

    log = (tmp_path / f"slurm-kangaroo-lit-{JOB_ID}.out").read_text()
    assert log.index(f"job {JOB_ID} start 1 on gpu[01-02]") < log.index("requeueing job") < log.index(
        f"job {JOB_ID} start 2") < log.index(f"resuming from {last} (restart 1)") < log.index("exited with status 0")


def test_a_partial_checkpoint_alone_starts_afresh(cluster):
    submit, calls, tmp_path = cluster
    partial = tmp_path / "run" / "checkpoints" / "last.ckpt.partial"  # a save that never completed
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"torn")
    assert submit(restart=0, fake_exit=0).returncode == 0
    assert "--ckpt_path" not in calls("fit.0")


@pytest.mark.parametrize("status", [143, 1])
def test_other_exits_are_not_requeued(cluster, status):
    """SIGTERM (scancel, preemption: SLURM requeues preempted jobs itself) and failures keep their status."""
    submit, calls, _ = cluster
    proc = submit(restart=0, fake_exit=status)
    assert proc.returncode == status and calls("scontrol") == []


@pytest.mark.parametrize("offline", ["1", "0"])
def test_offline_hub_settings_reach_every_task(cluster, offline):
    submit, calls, _ = cluster
    submit(restart=0, fake_exit=0, OFFLINE=offline)
    env = dict(line.split("=", 1) for line in calls("env.0") if "=" in line)
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if offline == "1":
        assert all(env.get(n) == "1" for n in names) and calls("srun.0")[0] == "--export=ALL"
    else:
        assert not any(n in env for n in names)


def test_strategy_none_runs_plain_ddp(cluster):
    submit, calls, _ = cluster
    submit(restart=0, fake_exit=0, STRATEGY="none", CONFIG="configs/tiny.yaml")
    fit = calls("fit.0")
    assert fit[:3] == ["fit", "--config", "configs/tiny.yaml"] and "configs/deepspeed-zero2.yaml" not in fit


# --------------------------------------------------------------------------------------------------
# The tasks: ranks from SLURM's variables, and what USR1 does


def test_slurm_variables_give_world_size_and_ranks(monkeypatch, tmp_path, tiny_llama_dir):
    """Task 5 of 8 (2 nodes x 4 tasks), with the flags fit.sbatch passes: Lightning's SLURMEnvironment."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    slurm_env(monkeypatch, ntasks=8, ntasks_per_node=4, nnodes=2, procid=5, localid=1, nodeid=1,
              nodelist="gpu[01-02]")
    # Building the Trainer makes this process "rank 5" for Lightning's rank-zero-only functions (and sets
    # MASTER_PORT): put both back afterwards, or later tests in this process would log nothing.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    for name in ("MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.setenv(name, "unset")  # recorded, so teardown restores the original state ...
        monkeypatch.delenv(name)  # ... and absent here, so the port comes from the job id
    args = [*fit_args(tmp_path, tiny_llama_dir), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--trainer.devices", "4", "--trainer.num_nodes", "2"]
    trainer = run_lightning(args, run=False).trainer  # built only: no process group
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally  # srun started the tasks
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert env.main_address == "gpu01" and env.main_port == 15000 + int(JOB_ID[-4:])
    assert not trainer.is_global_zero
    # flags that disagree with the allocation are refused by Lightning as fit starts, naming the fix
    cli = run_lightning([*args[:-4], "--trainer.devices", "2", "--trainer.num_nodes", "2"], run=False)
    with pytest.raises(ValueError, match=r"ntasks-per-node=4.*HINT: Set `devices=4`"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    calls = tmp_path / "scontrol.calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", f'echo "$@" >> {calls}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_lightning_alone_would_checkpoint_inside_the_usr1_handler(tmp_path, tiny_llama_dir, monkeypatch,
                                                                  fake_scontrol):
    """The negative control: under SLURM, Lightning's own USR1 handler writes hpc_ckpt_1.ckpt from inside
    the handler (wherever Python happened to be) and requeues, while training goes on."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tests.helpers import SendSignalAt, make_module, toy_batches

    slurm_env(monkeypatch)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SendSignalAt(2, signal.SIGUSR1)])
    trainer.fit(make_module(tiny_llama_dir), DataLoader(toy_batches(4), batch_size=None))
    assert (tmp_path / "hpc_ckpt_1.ckpt").is_file() and trainer.global_step == 4
    assert fake_scontrol.read_text().split() == ["requeue", JOB_ID]


def test_usr1_stops_at_a_step_saves_last_ckpt_and_exits_138(tmp_path, tiny_llama_dir, monkeypatch, fake_scontrol,
                                                            capsys):
    """What each task does: finish the step, save last.ckpt (not an hpc checkpoint from a signal handler),
    exit 128 + USR1 and leave the requeue to the job script."""
    slurm_env(monkeypatch)
    code = main(["fit", *fit_args(tmp_path, tiny_llama_dir), "--trainer.max_steps", "50",
                 "--checkpoint.every_n_train_steps", "20", "--trainer.callbacks+=tests.helpers.SendSignalAt",
                 "--trainer.callbacks.step", "3", "--trainer.callbacks.signum", str(int(signal.SIGUSR1))])
    assert code == 128 + signal.SIGUSR1 == 138
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt")) and not fake_scontrol.exists()
    assert "stopped by SIGUSR1 after step 3" in capsys.readouterr().err
