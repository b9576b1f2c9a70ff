"""Session-wide test settings that must precede every import."""

import atexit
import os
import shutil
import tempfile

# Tests never touch the real run cache (~/.cache/dmc/runs): every test and every command it starts gets its own,
# removed when the session ends (each pytest process made one and left it behind before).
os.environ["DMC_RUN_CACHE"] = tempfile.mkdtemp(prefix="dmc-test-runs-")
atexit.register(shutil.rmtree, os.environ["DMC_RUN_CACHE"], True)

# Under pytest-xdist each worker gets its share of the cores, for itself and for the commands its tests start:
# two workers each running torch with every core's worth of OpenMP threads spin against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU, Triton kernels can only run in its interpreter; triton reads the switch when it is first
# imported (transformers imports it through torch._dynamo), so it must be set before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The longest tests (minutes each, measured by --durations), longest first. Started first, they spread over
# the workers (xdist's load scheduling hands out tests in order), and the run ends on short tests, not on one
# worker's rehearsal while the other idles.
LONGEST = ("test_full_rehearsal_of_a_paper_recipe", "test_end_to_end_on_the_135m_model_vanilla_and_dmc",
           "test_train_export_eval_generate_bench_from_a_hub_id",
           "test_handover_reaches_deepspeed_master_copy_and_exports_two_processes",
           "test_the_wheel_in_a_fresh_environment_trains_exports_and_evaluates_from_an_empty_folder")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST.index(item.originalname) if item.originalname in LONGEST else len(LONGEST))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny vanilla Llama folder, a DMC retrofit of it with mixed decisions (about half merge) and a DMS retrofit
    with random gates (about half flagged, window 3)."""
    import torch
    from transformers import AutoModelForCausalLM

    import dmc
    from dmc.export import save_folder
    from tests.helpers import drive_mixed_decisions, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    vanilla = write_tiny_checkpoint(root / "tiny-vanilla")
    model = dmc.retrofit(AutoModelForCausalLM.from_pretrained(vanilla), dmc.DMCConfig(window=12)).eval()
    drive_mixed_decisions(model)
    save_folder(model, root / "tiny-dmc", vanilla, dtype="float32")
    dms = dmc.retrofit(AutoModelForCausalLM.from_pretrained(vanilla), dmc.DMSConfig(window=3, gate_offset=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in dms.model.layers:
            layer.dms_gate.proj.weight.copy_(torch.randn(layer.dms_gate.proj.weight.shape, generator=g) * 0.1)
    save_folder(dms, root / "tiny-dms", vanilla, dtype="float32")
    return vanilla, root / "tiny-dmc", root / "tiny-dms"
