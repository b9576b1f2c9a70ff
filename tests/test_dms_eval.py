"""DMS folders through dmc compare, dmc generate and continuous batching, and one-line refusals of what a DMS folder
cannot do. (dmc eval's scores equal decoding on the DMS cache: tests/test_eval.py; dmc generate --kv-bits on a DMS
folder: tests/test_kv_quant_cache.py.)"""

import json

import pytest

import dmc
from dmc.eval.compare import main as compare_main
from tests.helpers import one_line_exit


def test_compare_puts_a_dms_folder_beside_the_policies(folders, tmp_path):
    out = tmp_path / "cmp"
    compare_main([str(folders[0]), "--dms", str(folders[2]), "--policies", "h2o", "--crs", "2", "--tasks", "ppl",
                  "--ppl-blocks", "2", "--ppl-block", "32", "--batch-size", "2", "--out", str(out)])
    models = json.loads((out / "results.json").read_text())["models"]
    (dms,) = [m for m in models.values() if m.get("role") == "dms"]
    assert dms["model_type"] == "dms_llama" and dms["tasks"]["ppl"]["realised_cr"] > 1.2


@pytest.mark.parametrize("option, index, words", [("--dmc", 2, "pass it with --dms"), ("--dms", 1, "pass it with --dmc"),
                                                   ("--control", 2, "pass it with --dms")])
def test_a_folder_under_the_wrong_option_is_one_line(folders, tmp_path, option, index, words):
    msg = one_line_exit(compare_main, str(folders[0]), option, str(folders[index]), "--tasks", "ppl",
                        "--out", str(tmp_path / "cmp"))
    assert words in msg and str(folders[index]) in msg, msg
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("budget_blocks", [400, 40])  # roomy: all in flight; tight: the budget limits the batch
def test_continuous_batching_on_dms_equals_each_request_alone(budget_blocks):
    """`dmc bench --budget-seqs`'s loop on a DMS model: each request's tokens and logits are its own generation's,
    the budget holds, every block is freed."""
    from dmc.eval.serving import Request, serve
    from tests.helpers import random_ids
    from tests.test_dms import mixed_dms
    from tests.test_serving import LENGTHS, _check_equal_alone

    model = mixed_dms("gqa", window=3)
    model.config.dms_block_size = 4
    block = 2 * 4 * model.config.head_dim * 8  # bytes of one block of 4 float64 slots, keys and values
    requests = [Request(random_ids(1, n, seed=i)[0], new) for i, (n, new) in enumerate(LENGTHS)]
    result = serve(model, requests, budget_blocks * block, block_size=4, record_logits=True)
    _check_equal_alone(result, model, requests, lambda: dmc.DMSCache(model.config, block_size=4))
    stats = result.stats
    assert 0 < stats.peak_bytes <= budget_blocks * block and stats.final_bytes == 0
    if budget_blocks == 40:
        assert stats.max_in_flight < len(requests)
