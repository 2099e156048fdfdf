"""Two processes on the CPU (gloo): DDP and FSDP train like one process with the same
global batch, FSDP checkpoints consolidate and load in one process, a run resumes with
another number of processes, and a rank that dies stops the others with a clear error.

Tolerance for comparing a 2-process run with the 1-process one: rel 1e-5 on the losses.
The processes sum half-batch gradients and all-reduce them, where one process sums the
whole batch: the same numbers added in another order, which in fp32 differ by ~1e-7
relative; a few AdamW steps on a tiny model keep the losses well inside 1e-5."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from hybridlab.core.checkpoint import is_sharded, latest_checkpoint, load_checkpoint
from hybridlab.core.model import Model
from hybridlab.core.spec import load_pipeline
from hybridlab.core.train import Trainer, consolidate

PIPELINE = """\
name: tiny
model:
  vocab_size: 32
  d_model: 32
  layers:
    - mixer: {kind: attention, heads: 2}
      ffn: {kind: swiglu, hidden: 48}
    - mixer: {kind: gated_deltanet, heads: 2}
data: {kind: mqar, vocab: 32, pairs: 4}
optimizer: {kind: adamw, lr: 3.0e-3}
schedule: {kind: constant}
steps: 6
batch_size: 8
log_every: 1
eval_batches: 1
checkpoint_every: 3
device: cpu
threads: 1
seed: 3
dist_timeout_s: 60
"""
TOL = 1e-5  # see the module docstring


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "eval/loss" not in r}


def hybridlab(*args, cwd, timeout=240):
    """``python -m hybridlab ARGS`` (or another module when args start with -m)."""
    command = [sys.executable, *(args if args[0] == "-m" else ("-m", "hybridlab", *args))]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(*args, cwd):
    return hybridlab("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hybridlab", *args,
                     cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, registry_module):
    """One process for 6 steps (the reference), DDP over 2 processes with micro-batches
    for 6, FSDP over 2 for 3 (a sharded checkpoint at step 3)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "p.yaml").write_text(PIPELINE)
    spec = load_pipeline(root / "p.yaml", registry=registry_module)
    one = Trainer(spec, root / "one", registry=registry_module, progress=False)
    one.run()
    shutil.copytree(root / "one" / "checkpoints" / "step-000003", root / "one-step3")
    # the shortcut that launches torchrun; 4 rows per process, 2 forwards of 2 rows each
    hybridlab("train", "p.yaml", "--nproc", "2", "--out", "ddp", "--quiet", "--set", "parallel=ddp",
              "--set", "micro_batch_size=2", cwd=root)
    torchrun("train", "p.yaml", "--out", "fsdp", "--quiet", "--set", "parallel=fsdp", "--set", "steps=3", cwd=root)
    return root, one


@pytest.fixture(scope="module")
def registry_module():
    from hybridlab.registry import default_registry

    return default_registry()


def test_ddp_and_fsdp_loss_curves_equal_one_process(runs):
    root, _ = runs
    one = losses(root / "one")
    assert sorted(one) == [1, 2, 3, 4, 5, 6]
    ddp, fsdp = losses(root / "ddp"), losses(root / "fsdp")
    assert sorted(ddp) == sorted(one) and sorted(fsdp) == [1, 2, 3]
    assert [ddp[s] for s in one] == pytest.approx([one[s] for s in one], rel=TOL)
    assert [fsdp[s] for s in fsdp] == pytest.approx([one[s] for s in fsdp], rel=TOL)
    assert is_sharded(latest_checkpoint(root / "fsdp"))
    assert not is_sharded(latest_checkpoint(root / "ddp"))  # DDP: rank 0 writes an ordinary one


def test_an_fsdp_checkpoint_consolidates_and_loads_in_one_process(runs, registry_module):
    root, one = runs
    path = consolidate(root / "fsdp", root / "fsdp-consolidated", registry=registry_module)
    assert (path / "model.safetensors").is_file() and not is_sharded(path)
    spec = one.spec.model
    tokens = torch.randint(0, 32, (3, 17), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, where in (("consolidated", path), ("sharded", latest_checkpoint(root / "fsdp")),
                        ("one", root / "one-step3")):
        model = Model(spec, registry_module)
        load_checkpoint(where, model, torch.device("cpu"))
        logits[name] = model(tokens).logits
    assert torch.equal(logits["consolidated"], logits["sharded"])  # the same numbers, moved
    # the 2-process weights vs the 1-process ones after 3 steps (the tolerance above)
    torch.testing.assert_close(logits["consolidated"], logits["one"], rtol=TOL, atol=TOL)
    # the consolidated run evaluates as the FSDP run did at its last step
    fsdp_eval = [json.loads(line) for line in (root / "fsdp" / "metrics.jsonl").read_text().splitlines()][-1]
    out = hybridlab("evaluate", "fsdp-consolidated", "--json", "e.json", cwd=root)
    assert out.returncode == 0
    assert json.loads((root / "e.json").read_text())["eval/loss"] == pytest.approx(fsdp_eval["eval/loss"], rel=1e-6)


def test_resume_with_another_number_of_processes(runs, registry_module):
    """FSDP on 2 -> one process (the sharded checkpoint, optimizer state included); one
    process -> FSDP on 2 (an ordinary checkpoint sharded on load). Both continue the
    reference's loss curve."""
    root, _ = runs
    reference = losses(root / "one")
    shutil.copytree(root / "fsdp", root / "fsdp-to-1")
    spec = load_pipeline(root / "fsdp-to-1" / "spec.yaml", ["steps=6"], registry=registry_module)
    Trainer(spec, root / "fsdp-to-1", registry=registry_module, resume=True, progress=False).run()
    resumed = losses(root / "fsdp-to-1")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([reference[s] for s in (4, 5, 6)], rel=TOL)

    (root / "one-to-2" / "checkpoints").mkdir(parents=True)
    for name in ("spec.yaml", "metrics.jsonl"):
        shutil.copy(root / "one" / name, root / "one-to-2" / name)
    shutil.copytree(root / "one-step3", root / "one-to-2" / "checkpoints" / "step-000003")
    (root / "one-to-2" / "checkpoints" / "latest").write_text("step-000003\n")
    torchrun("train", "--resume", "one-to-2", "--quiet", "--set", "parallel=fsdp", cwd=root)
    resumed = losses(root / "one-to-2")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([reference[s] for s in (4, 5, 6)], rel=TOL)
    assert is_sharded(latest_checkpoint(root / "one-to-2"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_stops_the_other_with_a_clear_error(tmp_path):
    """Two processes started by hand (torchrun's agent would stop the survivor itself): rank
    1 is killed mid-run; rank 0 must exit with status 2 and one line saying so, long
    before dist_timeout_s, and never hang."""
    (tmp_path / "p.yaml").write_text(PIPELINE)
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "hybridlab", "train", "p.yaml", "--out", "run", "--quiet", "--set", "parallel=ddp",
             "--set", "steps=100000", "--set", "checkpoint_every=0"], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # both are training
            assert time.monotonic() < deadline and procs[0].poll() is None, "the run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        assert time.monotonic() - killed < 60  # dist_timeout_s; a lost peer is noticed at once
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("rank 0 of 2: lost contact with the other processes while training"), err[-2000:]
    assert "--resume RUN_DIR" in line and "Traceback" not in err


def test_more_processes_than_none_is_an_error(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "hybridlab", "train", "p.yaml", "--out", "run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "parallel is none; set parallel: ddp or parallel: fsdp" in done.stderr


@pytest.mark.parametrize("sets, message", [
    ((), "--nproc 2 starts 2 processes but the pipeline's parallel is none"),
    (("--set", "parallel=ddp", "--set", "batch_size=7"), "batch_size 7 does not split over 2 processes"),
    (("--set", "parallel=ddp", "--set", "micro_batch_size=3"), "micro_batch_size 3 does not divide"),
])
def test_nproc_checks_the_pipeline_before_it_launches(tmp_path, sets, message):
    """Found probing: these errors came once per process, then torchrun's traceback, exit 1;
    now one line and exit 2, and no process starts."""
    (tmp_path / "p.yaml").write_text(PIPELINE)
    done = subprocess.run([sys.executable, "-m", "hybridlab", "train", "p.yaml", "--nproc", "2", *sets,
                           "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "launching" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_muon_under_fsdp_is_a_located_error(tmp_path):
    """Found probing: each process orthogonalised its own shard of a matrix, a different
    update from one process's (about 10 % of it), with no word said."""
    from hybridlab.core.errors import SpecError

    (tmp_path / "p.yaml").write_text(PIPELINE.replace("optimizer: {kind: adamw, lr: 3.0e-3}",
                                                      "optimizer: {kind: muon}\nparallel: fsdp"))
    with pytest.raises(SpecError, match=r"p.yaml:\d+: parallel: fsdp shards every weight, and the muon optimizer"):
        load_pipeline(tmp_path / "p.yaml")
    load_pipeline(tmp_path / "p.yaml", ["parallel=ddp"])  # ddp holds whole matrices: fine
