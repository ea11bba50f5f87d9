"""Shared test fixtures: the offline material beside the repo and a tiny random T5.

    python -m pytest -q tests          # the whole default suite, offline, CPU
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # ../shared beside the checkout (CI lays a copy there)
CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
sys.path.insert(0, str(REPO))
# The suite is offline: the Hub client reads its local cache only, so a Hub name not in it fails at
# once (unset, with no network, the client retries ~25 s first). Set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(REPO / "scripts"))  # the benchmarks, tested like the stages
from make_tiny import make_tiny  # noqa: E402
from ept import files  # noqa: E402


def save_folded_prompt(path, prompt, meta=None):
    """A prompt.pt as train.finish writes it: P' (n, d) fp32 and plain metadata."""
    files.save_torch(path, {"prompt": prompt.detach().float().cpu().contiguous(), "meta": dict(meta or {})})


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "slow: longer integration test")


# The slowest integration tests (15-45 s each on 2 cores): out of the default suite (pytest.ini:
# -m "not slow"), run by .ci/run after it (`python -m pytest -q -rs -m slow tests`).
SLOW = {"test_sigkill_then_resume_equals_uninterrupted", "test_grid_on_slurm_equals_in_process_with_a_requeue_and_a_failed_unit",
        "test_sigkill_of_a_pack_then_resume_equals_uninterrupted", "test_ept_steers_at_its_chosen_lr",
        "test_two_children_equal_the_in_process_run", "test_prepare_data_then_train_then_evaluate_multirc_fewshot",
        "test_torchrun_failure_is_one_sentence", "test_sigterm_checkpoints_at_a_step_boundary_and_resume_logs_each_step_once",
        "test_a_sigkilled_child_is_resumed_nothing_lost_or_doubled", "test_torchrun_pack_two_processes_equal_one",
        "test_cancelled_array_then_the_same_command_finishes_what_was_left", "test_each_child_a_torchrun_group",
        "test_pt_steers_on_every_seed", "test_ddp_two_processes_equal_one", "test_failed_start_leaves_no_folder",
        "test_sigusr1_stops_a_pack_with_status_138_and_resume_continues_every_run",
        "test_plan_lines_run_by_hand_from_anywhere_idempotent_and_collected_once", "test_torchrun_two_processes_equal_one",
        "test_train_first_use_preparation_takes_source", "test_a_lock_held_by_a_live_process_that_is_not_ours",
        "test_every_pass_through_flag_means_the_same_at_any_pack_size", "test_sigint_stops_every_child_and_a_rerun_resumes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW:
            item.add_marker(pytest.mark.slow)
    import torch
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def shared_dir():
    """../shared, or None when this checkout has none beside it."""
    return SHARED if SHARED.is_dir() else None


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir):
    """The real T5 tokenizer folder, or None."""
    path = SHARED / "data" / "t5"
    return path if (path / "tokenizer.json").exists() else None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A random-weight tiny T5 + tokenizer (the real one when present, else trained offline)."""
    out = tmp_path_factory.mktemp("tiny-t5")
    return make_tiny(out, tokenizer=str(tokenizer_dir) if tokenizer_dir else None)


@pytest.fixture(scope="session")
def rte_data_dir(tmp_path_factory, tiny_model_dir):
    """RTE's fixture rows prepared with the tiny T5's tokenizer, once: the drivers' tests train on it (read only)."""
    import prepare_data
    out = tmp_path_factory.mktemp("rte-data")
    prepare_data.main(["--source", str(REPO / "tests" / "fixtures" / "raw"), "--tasks", "rte", "--out", str(out),
                       "--tokenizer", str(tiny_model_dir)])
    return out


@pytest.fixture(scope="module")
def one_thread():
    """A tiny T5 gains nothing from threads, and oversubscribed threads on a busy machine slow it 30x.
    Modules that train tiny models use it: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cluster():
    """The one-node test cluster: used when it runs, started when this is root (and SLURM installed, or
    EPT_SLURM_TESTS=1 to install it), stopped again if this started it."""
    required = os.environ.get("EPT_SLURM_TESTS") == "1"
    ours = Path("/etc/slurm/slurm.conf").is_file() and \
        "written by scripts/slurm_cluster.sh" in Path("/etc/slurm/slurm.conf").read_text()
    if shutil.which("sinfo") and ours and subprocess.run(["bash", str(CLUSTER), "status"],
                                                         capture_output=True).returncode == 0:
        yield
        return
    reason = None
    if shutil.which("sinfo") and not ours and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        reason = "a SLURM cluster answers here that is not scripts/slurm_cluster.sh's; no test jobs for it"
    elif os.geteuid() != 0:
        reason = "no test cluster runs and starting one needs root (bash scripts/slurm_cluster.sh start)"
    elif not shutil.which("sbatch") and not required:
        reason = "SLURM is not installed (EPT_SLURM_TESTS=1 installs it with apt-get, as .ci/run does)"
    if reason is None:
        started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True)
        if started.returncode == 0:
            yield
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True)
            return
        reason = f"scripts/slurm_cluster.sh start failed: {started.stderr.strip()}"
    if required:
        pytest.fail(f"EPT_SLURM_TESTS=1 but {reason}")
    pytest.skip(reason)
