"""The run's hooks: the common stop decision of several processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# One rank of a 2-process gloo group: vote six times, asking to stop from vote `ask_from` on (a signal's
# flag stays set), and write the decisions.
VOTER = """
import json, sys
import torch, torch.distributed as dist
from sd_lora.outputs import StopVote
rank, ask_from, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
vote = StopVote(torch.device("cpu"))
decisions = [vote(ask_from >= 0 and i >= ask_from) for i in range(6)]
dist.destroy_process_group()
open(out, "w").write(json.dumps(decisions))
"""


@pytest.mark.slow
@pytest.mark.parametrize("asks", [(-1, 2), (4, 1), (-1, -1)])
def test_processes_stop_together_one_step_after_the_first_request(tmp_path, asks):
    procs = [subprocess.Popen([sys.executable, "-c", VOTER, str(rank), str(ask_from), str(tmp_path / "store"), str(tmp_path / f"{rank}.json")])
             for rank, ask_from in enumerate(asks)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    decisions = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    first = min((a for a in asks if a >= 0), default=None)
    expected = [first is not None and i > first for i in range(6)]  # the vote of step i is read at step i + 1
    assert decisions == [expected, expected]


def test_readme_names_every_file_the_sample_hooks_write():
    """The README's table of outputs lists the grids `RunOutputs.sample` and `compare_with_base` write."""
    import inspect
    import re
    from pathlib import Path

    from sd_lora.outputs import RunOutputs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for hook in (RunOutputs.sample, RunOutputs.compare_with_base):
        (suffix,) = re.findall(r'output_name\}(-[a-z-]*step)\{step:08d\}\.png', inspect.getsource(hook))
        assert f"| `out/samples/<name>{suffix}NNNNNNNN.png` |" in readme, suffix


@pytest.mark.slow
def test_grids_draw_the_prompt_files_sizes_and_seeds_and_record_them(tiny_dataset, tiny_model_dir, tmp_path):
    """A prompt file's --w/--h/--d/--s/--l/--ss reach the grid the run writes, and the PNG records what was drawn."""
    from PIL import Image

    from sd_lora.config import load_config
    from sd_lora.train import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two rows\nzkchar --d 40\n\nzkchar, tall --w 16 --h 48 --s 3 --l 2 --n blurry --ss k_euler_a\n", encoding="utf-8")
    out = tmp_path / "out"
    run(load_config(["--data", str(tiny_dataset), "--model", str(tiny_model_dir), "--output-dir", str(out),
                     "--resolution", "32", "--batch-size", "2", "--rank", "4", "--max-steps", "1", "--sample-every", "1",
                     "--sample-steps", "2", "--sample-seeds", "2", "--sample-prompts", str(prompts), "--output-name", "zk"]))
    with Image.open(out / "samples" / "zk-step00000001.png") as grid:
        log = json.loads(grid.text["sd_lora"])
        # grid.py's layout: slot 32x48 (widest, tallest cell) scaled x3 to 96x144, font 12 so the label column is
        # 120 wide and the title and header rows 27 high; two seed columns, two prompt rows
        assert grid.size == (120 + 2 * (96 + 4) + 4, 27 + 27 + 2 * (144 + 4))
    assert log["step"] == 1 and log["sampler"] == "ddim" and log["seeds"] == [0, 1]
    assert log["rows"] == [
        {"prompt": "zkchar", "negative": "", "width": 32, "height": 32, "steps": 2, "cfg": 7.5, "seeds": [40, 41], "sampler": "ddim"},
        {"prompt": "zkchar, tall", "negative": "blurry", "width": 16, "height": 48, "steps": 3, "cfg": 2.0, "seeds": [0, 1],
         "sampler": "k_euler_a"},
    ]
